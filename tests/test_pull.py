"""``p2pdist pull``: the archive it hands Docker (unit), and the real CLI in a subprocess
against a real docker-registry, real node daemons and a private real dockerd."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from bench.cluster import Cluster
from bench.image import Image, make_image, make_shell_image, push_image, push_index
from bench.localregistry import LocalRegistry
from p2pdist.digest import Digest, sha256_digest
from p2pdist.docker import parse_load_output
from p2pdist.errors import DockerError
from p2pdist.importer import import_archive
from p2pdist.progress import LineProgress
from p2pdist.pull import (
    docker_archive_members,
    docker_name,
    oci_manifest,
    tar_stream,
    tar_stream_size,
)
from p2pdist.reference import parse_reference
from p2pdist.registry import MEDIA_OCI_MANIFEST, ImageManifest, parse_manifest
from p2pdist.store import PieceStore
from tests.faultproxy import FaultProxy
from tests.helpers import requires_registry
from tests.runtimes import Dockerd
from tests.test_get_cli import clean_env

MIB = 1 << 20
RUN_TIMEOUT = 90.0


def _image_manifest(image: Image) -> ImageManifest:
    parsed = parse_manifest(image.manifest, image.manifest_media_type)
    assert isinstance(parsed, ImageManifest)
    return parsed


# -- unit: the archive, names, the engine's answers, the OCI conversion, progress ---------


def test_docker_archive_is_a_tar_that_names_config_and_layers(tmp_path: Path) -> None:
    image = make_image(size=300_000, layers=2, seed=11)
    manifest = _image_manifest(image)
    files: dict[Digest, Path] = {}
    for digest, data in image.blobs().items():
        path = tmp_path / digest.removeprefix("sha256:")
        path.write_bytes(data)
        files[Digest.parse(digest)] = path
    members = docker_archive_members(manifest, files)

    async def collect() -> bytes:
        return b"".join([chunk async for chunk in tar_stream(members)])

    archive = trio.run(collect)
    assert len(archive) == tar_stream_size(members)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        names = tar.getnames()
        assert names[-1] == "manifest.json"
        (entry,) = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert entry["Config"] == f"blobs/sha256/{image.config_digest.removeprefix('sha256:')}"
        assert entry["Layers"] == [f"blobs/sha256/{d.digest.hex}" for d in manifest.layers]
        assert entry["RepoTags"] == []
        for digest, data in image.blobs().items():
            member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert member is not None and member.read() == data


def test_tar_stream_refuses_a_file_that_changed_size(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 5000)
    members: list[tuple[str, Path | bytes]] = [("blobs/sha256/a", path)]

    async def consume() -> None:
        async for chunk in tar_stream(members):
            if len(chunk) == 512:  # after the header: the file grows under us
                path.write_bytes(b"x" * 9000)

    with pytest.raises(Exception, match="changed size"):
        trio.run(consume)


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("alpine:3", "alpine"),
        ("docker.io/library/alpine", "alpine"),
        ("user/app:v1", "user/app"),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000/team/app"),
        ("registry.example.com/app@sha256:" + "a" * 64, "registry.example.com/app"),
    ],
)
def test_docker_name(text: str, name: str) -> None:
    assert docker_name(parse_reference(text)) == name


def test_parse_load_output() -> None:
    body = b'{"stream":"Loaded image ID: sha256:' + b"ab" * 32 + b'\\n"}\r\n'
    assert parse_load_output(body) == ["sha256:" + "ab" * 32]
    assert parse_load_output(b"") == []
    with pytest.raises(DockerError, match="docker load: invalid tar header"):
        parse_load_output(b'{"errorDetail":{"message":"invalid tar header"},"error":"x"}\n')
    with pytest.raises(DockerError, match="unexpected answer"):
        parse_load_output(b"<html>")


def test_oci_manifest_keeps_blob_digests_and_oci_bytes() -> None:
    docker_image = make_image(size=1000, layers=2, seed=3)
    media_type, data = oci_manifest(_image_manifest(docker_image))
    assert media_type == MEDIA_OCI_MANIFEST
    converted = parse_manifest(data, media_type)
    assert isinstance(converted, ImageManifest)
    original = _image_manifest(docker_image)
    assert converted.config.digest == original.config.digest
    assert converted.config.media_type == "application/vnd.oci.image.config.v1+json"
    assert [(d.digest, d.size) for d in converted.layers] == [
        (d.digest, d.size) for d in original.layers
    ]
    assert {d.media_type for d in converted.layers} == {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    }
    oci_image = make_image(size=1000, layers=1, seed=3, oci=True)
    assert oci_manifest(_image_manifest(oci_image)) == (MEDIA_OCI_MANIFEST, oci_image.manifest)


def test_line_progress_prints_one_line_per_finished_item_when_not_live() -> None:
    out = io.StringIO()
    progress = LineProgress(["config", "abc"], stream=out, live=False)
    progress.update(1, 10, 100)
    assert out.getvalue() == ""
    progress.finish(1, "verified")
    progress.finish(0, "verified")
    assert out.getvalue() == "abc: verified\nconfig: verified\n"


def test_line_progress_redraws_in_place_when_live() -> None:
    out = io.StringIO()
    progress = LineProgress(["a", "b"], stream=out, live=True)
    progress.finish(0, "verified")
    progress.finish(1, "verified")
    text = out.getvalue()
    assert text.count("\x1b[2Ka: ") == 2 and "\x1b[2F" in text  # second draw moved up 2 lines
    assert text.endswith("\x1b[2Kb: verified\n")


# -- the CLI ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return f"exit {self.returncode} after {self.seconds:.2f}s; stderr: {self.stderr!r}"


class Pull:
    """Runs ``p2pdist pull`` in a subprocess with its own home and data directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        self.env = clean_env(home)
        self.data_dir = tmp_path / "data"

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "p2pdist", "pull", *args, "--data-dir", str(self.data_dir)],
            env={**self.env, **(env or {})},
            cwd=self.tmp,
            capture_output=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        return Result(
            proc.returncode, proc.stderr.decode(errors="replace"), time.monotonic() - started
        )


@pytest.fixture
def pull(tmp_path: Path) -> Pull:
    return Pull(tmp_path)


def _check_layout(root: Path, image: Image, tag: str) -> None:
    """``root`` is a complete OCI layout of ``image`` under ``tag``: every blob hashes to
    its name, and the index names an OCI manifest with the image's config and layers."""
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    for blob in (root / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    index = json.loads((root / "index.json").read_bytes())
    (entry,) = [
        m
        for m in index["manifests"]
        if m["annotations"]["org.opencontainers.image.ref.name"] == tag
    ]
    assert entry["mediaType"] == MEDIA_OCI_MANIFEST
    data = (root / "blobs" / "sha256" / entry["digest"].removeprefix("sha256:")).read_bytes()
    manifest = parse_manifest(data, MEDIA_OCI_MANIFEST)
    assert isinstance(manifest, ImageManifest)
    assert str(manifest.config.digest) == image.config_digest
    assert [d.digest for d in manifest.layers] == [d.digest for d in _image_manifest(image).layers]


@requires_registry
@pytest.mark.integration
def test_pull_output_writes_an_oci_layout_others_read(
    pull: Pull, tmp_path: Path, registry: LocalRegistry
) -> None:
    image = make_image(size=3 * MIB, layers=3, seed=21)
    push_image(registry.url, "pull/layout", "v1", image)
    layout = tmp_path / "layout"
    r = pull(f"{registry.host}/pull/layout:v1", "--output", str(layout))
    assert r.returncode == 0, r
    assert "verified" in r.stderr
    _check_layout(layout, image, "v1")
    # a second tag of another image goes into the same layout, the first stays
    other = make_image(size=MIB, layers=1, seed=22)
    push_image(registry.url, "pull/layout", "v2", other)
    r = pull(f"{registry.host}/pull/layout:v2", "--output", str(layout))
    assert r.returncode == 0, r
    _check_layout(layout, image, "v1")
    _check_layout(layout, other, "v2")
    # p2pdist import reads it back (every blob re-verified) ...
    result = import_archive(str(layout), tmp_path / "seed", tags=[])
    assert {str(b.digest) for b in result.blobs} >= set(image.blobs())
    # ... and so does skopeo, when installed
    if subprocess.run(["which", "skopeo"], capture_output=True).returncode == 0:
        out = subprocess.run(
            ["skopeo", "inspect", "--raw", f"oci:{layout}:v1"],
            capture_output=True,
            timeout=30,
            check=True,
        )
        assert json.loads(out.stdout)["config"]["digest"] == image.config_digest


@requires_registry
@pytest.mark.integration
def test_pull_of_an_index_takes_the_platform_asked_for(
    pull: Pull, tmp_path: Path, registry: LocalRegistry
) -> None:
    amd = make_image(size=MIB, layers=1, seed=31, platform="linux/amd64")
    arm = make_image(size=MIB, layers=1, seed=32, platform="linux/arm64")
    push_index(registry.url, "pull/multi", "v1", [amd, arm])
    out = tmp_path / "arm"
    r = pull(f"{registry.host}/pull/multi:v1", "--platform", "linux/arm64", "--output", str(out))
    assert r.returncode == 0, r
    _check_layout(out, arm, "v1")
    assert not (out / "blobs" / "sha256" / amd.config_digest.removeprefix("sha256:")).exists()


@requires_registry
@pytest.mark.integration
def test_pull_refuses_corrupt_blobs_and_writes_nothing_that_looks_complete(
    pull: Pull, tmp_path: Path, registry: LocalRegistry
) -> None:
    image = make_image(size=2 * MIB, layers=2, seed=41)
    push_image(registry.url, "pull/corrupt", "v1", image)
    layout = tmp_path / "layout"
    with FaultProxy(registry.url) as proxy:
        proxy.flip_byte_in_blobs = True
        r = pull(f"{proxy.host}/pull/corrupt:v1", "--output", str(layout))
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 8
    assert not (layout / "index.json").exists()
    store = PieceStore(pull.data_dir)
    assert store.list_blobs() == []


@requires_registry
@pytest.mark.integration
def test_pull_errors_are_one_line_with_get_exit_codes(
    pull: Pull, tmp_path: Path, registry: LocalRegistry
) -> None:
    image = make_image(size=MIB, layers=1, seed=51)
    push_image(registry.url, "pull/errors", "v1", image)
    cases = [
        (["NOT A REFERENCE"], 2, "invalid image reference"),
        ([f"{registry.host}/pull/errors:nope", "--output", str(tmp_path / "o")], 3, "not found"),
        ([f"{registry.host}/pull/errors:v1", "--output", str(tmp_path / "x" / "y")], 2, "exist"),
        (
            [f"{registry.host}/pull/errors:v1", "--docker-host", f"unix://{tmp_path}/none.sock"],
            4,
            "cannot reach Docker",
        ),
        ([f"{registry.host}/pull/errors:v1", "--docker-host", "ssh://host"], 2, "unsupported"),
    ]
    (tmp_path / "file").write_text("x")
    cases.append(([f"{registry.host}/pull/errors:v1", "--output", str(tmp_path / "file")], 2, ""))
    for args, code, message in cases:
        r = pull(*args)
        assert r.returncode == code, (args, r)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("p2pdist: error:"), (args, r)
        assert message.lower() in lines[0].lower(), (args, r)
    # Docker unreachable is found before any download
    assert not (pull.data_dir / "blobs").exists() or not any((pull.data_dir / "blobs").rglob("*"))


# -- through the daemon, and into a real dockerd --------------------------------------------


def _docker_image(dockerd: Dockerd, name: str) -> dict[str, object] | None:
    r = dockerd.api("GET", f"/images/{name}/json")
    if r.status_code == 404:
        return None
    r.raise_for_status()
    result: dict[str, object] = r.json()
    return result


def _diff_ids(image: Image) -> list[str]:
    return [sha256_digest(t).__str__() for t in image.uncompressed_layers()]


@requires_registry
@pytest.mark.integration
def test_pull_loads_into_docker_verified_and_tagged(
    pull: Pull, registry: LocalRegistry, dockerd: Dockerd
) -> None:
    image = make_shell_image(size=4 * MIB, layers=2, seed=61)
    push_image(registry.url, "pull/docker", "v1", image)
    name = f"{registry.host}/pull/docker"
    r = pull(f"{name}:v1", "--docker-host", dockerd.url)
    assert r.returncode == 0, r
    # the image runs
    ran = dockerd.docker(
        "run", "--rm", "--network", "none", f"{name}:v1", "/bin/sh", "-c", "echo pulled-ok"
    )
    assert ran.stdout.strip() == "pulled-ok", ran
    inspected = _docker_image(dockerd, f"{name}:v1")
    assert inspected is not None, r
    assert inspected["Id"] == image.config_digest
    assert inspected["RootFS"] == {"Type": "layers", "Layers": _diff_ids(image)}  # type: ignore[comparison-overlap]
    assert f"{name}:v1" in inspected["RepoTags"]  # type: ignore[operator]
    # one progress line per blob (config + 3 layers) on a non-terminal, then the summary
    assert sum(": verified" in line for line in r.stderr.splitlines()) == 4, r
    assert f"loaded {name}:v1 into Docker" in r.stderr

    # by digest: loaded, left untagged
    other = make_image(size=MIB, layers=1, seed=62)
    digest = push_image(registry.url, "pull/docker", "v2", other)
    r = pull(f"{name}@{digest}", "--docker-host", dockerd.url)
    assert r.returncode == 0, r
    inspected = _docker_image(dockerd, other.config_digest)
    assert inspected is not None and inspected["RepoTags"] == []


@requires_registry
@pytest.mark.integration
def test_pull_through_the_daemon_swarm_into_docker(
    pull: Pull, tmp_path: Path, registry: LocalRegistry, dockerd: Dockerd
) -> None:
    image = make_image(size=6 * MIB, layers=3, seed=71)
    push_image(registry.url, "pull/swarm", "v1", image)
    name = f"{registry.host}/pull/swarm"
    with Cluster(tmp_path / "c", daemons=2, piece_size="1MiB") as c:
        for i, d in enumerate(c.daemons):
            r = pull(f"{name}:v1", "--daemon", d.api_url, "--docker-host", dockerd.url)
            assert r.returncode == 0, (i, r, c.log_tails())
            # the bytes came through this node's daemon: it holds every blob, verified
            for blob in image.blobs():
                c.stats(i, blob)  # answers once the download has finished (blob stored)
                assert d.blob_file(blob).is_file(), (i, blob)
        # the second node got its layers from the first, not the registry
        layer = str(_image_manifest(image).layers[0].digest)
        stats = c.stats(1, layer)
        assert stats["from_peers"] > 0 and stats["from_source"] == 0, stats
    inspected = _docker_image(dockerd, f"{name}:v1")
    assert inspected is not None and inspected["Id"] == image.config_digest
    # the CLI kept nothing of its own: it spooled through a temporary directory
    assert not pull.data_dir.exists() or not any(pull.data_dir.rglob("*.partial"))


def test_a_failed_pull_leaves_no_partial_blob_in_the_layout(tmp_path: Path) -> None:
    from p2pdist.pull import _spool_dir

    layout = tmp_path / "layout"
    with pytest.raises(RuntimeError, match="stream cut"), _spool_dir(layout) as spool:
        (spool / f".{'a' * 64}.partial").write_bytes(b"half a blob")
        raise RuntimeError("stream cut")
    assert list((layout / "blobs" / "sha256").iterdir()) == []
