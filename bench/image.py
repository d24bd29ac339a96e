"""Synthetic container images, deterministic from a seed, and pushing them to a registry.

    image = make_image(size=64 << 20, layers=4, layer_format="gzip", seed=1)
    with LocalRegistry() as reg:
        digest = push_image(reg.url, "test/app", "v1", image)

* ``layer_format="gzip"``: each layer is a gzip'd (level 1) tar of random, incompressible
  files; the blob is about as large as its content.
* ``layer_format="tar"``: each layer is an uncompressed tar of text-like files that compress
  about 3:1 (gzip -1 ≈ 2.9, zstd -3 ≈ 3.1).
* ``size`` is the total bytes of file content across all layers (tar headers and gzip framing
  come on top), split evenly over ``layers``.

Layers are real tar archives (``tarfile`` headers, ustar, fixed mtime/uid/gid, end-of-archive
blocks), the config is a valid image config whose ``rootfs.diff_ids`` are the sha256 of each
uncompressed tar, and the manifest is Docker v2 schema 2 (or OCI with ``oci=True``), so
``docker load``/``docker pull``/skopeo accept the result.  Same arguments → same bytes.

``make_shell_image(size=..., layers=..., seed=...)`` is a *runnable* image (``docker run
IMAGE /bin/sh -c 'echo hi'``): a first layer with the host's ``/bin/dash`` as ``/bin/sh``
and the shared libraries ``ldd`` lists for it, then synthetic layers as above.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import struct
import subprocess
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER_GZIP",
    "DOCKER_LAYER_TAR",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER_GZIP",
    "OCI_LAYER_TAR",
    "OCI_MANIFEST",
    "Auth",
    "BearerAuth",
    "Image",
    "LayerFormat",
    "PushError",
    "docker_save_tar",
    "host_platform",
    "make_image",
    "make_index",
    "make_shell_image",
    "push_blob",
    "push_image",
    "push_index",
    "push_manifest",
    "sha256",
    "shared_libraries",
]

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"

LayerFormat = Literal["gzip", "tar"]

_FILE_SIZE = 4 << 20  # content files are at most this large
_MTIME = 946684800  # 2000-01-01T00:00:00Z, fixed so that layers are reproducible
# Byte → character table for tar-format content: mostly four letters plus spaces and newlines,
# which gzip -1 shrinks about 3:1 (a 4-symbol alphabet is 2 bits/byte before framing).
_TEXT_TABLE = bytes(
    (b"\n" if i < 3 else b" " if i < 15 else b"etao"[i % 4 : i % 4 + 1])[0] for i in range(256)
)


def sha256(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Image:
    """One platform's image: config, layer blobs (as stored in the registry) and manifest."""

    config: bytes
    layers: list[bytes]
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    config_media_type: str
    layer_media_type: str
    diff_ids: list[str]
    platform: str
    oci: bool
    layer_format: LayerFormat
    layer_digests: list[str] = field(default_factory=list)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def os(self) -> str:
        return self.platform.split("/")[0]

    @property
    def architecture(self) -> str:
        return self.platform.split("/")[1]

    @property
    def variant(self) -> str | None:
        parts = self.platform.split("/")
        return parts[2] if len(parts) > 2 else None

    @property
    def blobs_size(self) -> int:
        """Total bytes of the config and layer blobs."""
        return len(self.config) + sum(len(b) for b in self.layers)

    def blobs(self) -> dict[str, bytes]:
        """digest → bytes for the config and every layer (not the manifest)."""
        out = {self.config_digest: self.config}
        for digest, data in zip(self.layer_digests, self.layers, strict=True):
            out[digest] = data
        return out

    def uncompressed_layers(self) -> list[bytes]:
        """The layer tars (gunzipped for gzip layers)."""
        if self.layer_format == "tar":
            return list(self.layers)
        return [gzip.decompress(b) for b in self.layers]


# -- generation ----------------------------------------------------------------------------


def _tar_member(name: str, data: bytes, mode: int = 0o644) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MTIME
    info.mode = mode
    info.uname = info.gname = "root"
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    pad = -len(data) % tarfile.BLOCKSIZE
    return header + data + b"\0" * pad


def _tar_dir(name: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mtime = _MTIME
    info.mode = 0o755
    info.uname = info.gname = "root"
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _make_layer_tar(
    rng: random.Random, index: int, content_size: int, layer_format: LayerFormat
) -> bytes:
    parts = [_tar_dir("p2pdist/"), _tar_dir(f"p2pdist/layer{index}/")]
    # A small, always-present file naming the layer (so even size=0 gives a distinct layer).
    parts.append(
        _tar_member(f"p2pdist/layer{index}/ID", f"layer {index} {rng.random()}\n".encode())
    )
    remaining, n = content_size, 0
    while remaining > 0:
        chunk = min(_FILE_SIZE, remaining)
        data = rng.randbytes(chunk)
        if layer_format == "tar":
            data = data.translate(_TEXT_TABLE)
            suffix = "txt"
        else:
            suffix = "bin"
        parts.append(_tar_member(f"p2pdist/layer{index}/f{n:05d}.{suffix}", data))
        remaining -= chunk
        n += 1
    # End of archive: two zero blocks, padded to tarfile's 10 KiB record size (as tarfile does).
    length = sum(len(p) for p in parts) + 2 * tarfile.BLOCKSIZE
    parts.append(b"\0" * (2 * tarfile.BLOCKSIZE + (-length % tarfile.RECORDSIZE)))
    return b"".join(parts)


_GZIP_CHUNK = 8 << 20
# gzip header: magic, deflate, no flags, mtime 0, xfl 4 (fastest), OS 255 (unknown).
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"


def _deflate_chunk(chunk: memoryview, last: bool) -> bytes:
    # Level 1 with the RLE strategy: 3x faster than the default strategy on random content
    # (which does not compress anyway) and still folds the tar padding.
    c = zlib.compressobj(1, zlib.DEFLATED, -15, 8, zlib.Z_RLE)
    out = c.compress(chunk)
    return out + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _gzip(data: bytes, pool: ThreadPoolExecutor) -> bytes:
    """gzip -1 of ``data``, one deflate stream compressed in parallel chunks (as pigz does).

    Each chunk but the last ends with a sync flush (byte-aligned, not final), so the
    concatenation is one valid deflate stream; mtime 0 keeps the output reproducible.
    """
    view = memoryview(data)
    starts = range(0, max(len(data), 1), _GZIP_CHUNK)
    bodies = pool.map(
        lambda s: _deflate_chunk(view[s : s + _GZIP_CHUNK], s + _GZIP_CHUNK >= len(data)), starts
    )
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    return b"".join([_GZIP_HEADER, *bodies, trailer])


def _parse_platform(platform: str) -> dict[str, str]:
    parts = platform.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be 'os/arch' or 'os/arch/variant', got {platform!r}")
    out = {"architecture": parts[1], "os": parts[0]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, indent=3).encode()


def make_image(
    *,
    size: int,
    layers: int,
    layer_format: LayerFormat = "gzip",
    seed: int = 0,
    platform: str = "linux/amd64",
    oci: bool = False,
) -> Image:
    """A synthetic image with ``layers`` layers holding ``size`` bytes of file content in all.

    Deterministic: the same arguments give the same bytes and digests.  256 MiB takes about
    1–2 s (gzip -1 in two threads).
    """
    if layers < 1:
        raise ValueError("an image needs at least one layer")
    if size < 0:
        raise ValueError("size must be >= 0")
    if layer_format not in ("gzip", "tar"):
        raise ValueError(f"layer_format must be 'gzip' or 'tar', got {layer_format!r}")
    _parse_platform(platform)
    rng = random.Random(f"p2pdist-image:{seed}:{layer_format}")
    per_layer = [size // layers + (1 if i < size % layers else 0) for i in range(layers)]
    tars = [_make_layer_tar(rng, i, n, layer_format) for i, n in enumerate(per_layer)]
    return _assemble_image(
        tars,
        layer_format=layer_format,
        platform=platform,
        oci=oci,
        seed=seed,
        history=[f"p2pdist synthetic layer {i}" for i in range(layers)],
    )


def _assemble_image(
    tars: list[bytes],
    *,
    layer_format: LayerFormat,
    platform: str,
    oci: bool,
    seed: int,
    history: list[str],
) -> Image:
    """The :class:`Image` over these layer tars: compressed (gzip) or not, a config whose
    ``rootfs.diff_ids`` are the tars' sha256, and a manifest (Docker v2 or OCI)."""
    plat = _parse_platform(platform)
    diff_ids = [sha256(t) for t in tars]
    if layer_format == "gzip":
        with ThreadPoolExecutor(max_workers=2) as pool:  # zlib releases the GIL
            blobs = [_gzip(t, pool) for t in tars]
    else:
        blobs = list(tars)
    del tars

    config_obj = {
        "architecture": plat["architecture"],
        "os": plat["os"],
        **({"variant": plat["variant"]} if "variant" in plat else {}),
        "created": "2000-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"p2pdist.synthetic.seed": str(seed)},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "2000-01-01T00:00:00Z", "created_by": created_by} for created_by in history
        ],
    }
    config = _dumps(config_obj)
    if oci:
        manifest_type, config_type = OCI_MANIFEST, OCI_CONFIG
        layer_type = OCI_LAYER_GZIP if layer_format == "gzip" else OCI_LAYER_TAR
    else:
        manifest_type, config_type = DOCKER_MANIFEST, DOCKER_CONFIG
        layer_type = DOCKER_LAYER_GZIP if layer_format == "gzip" else DOCKER_LAYER_TAR
    layer_digests = [sha256(b) for b in blobs]
    manifest = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "size": len(config), "digest": sha256(config)},
            "layers": [
                {"mediaType": layer_type, "size": len(b), "digest": d}
                for b, d in zip(blobs, layer_digests, strict=True)
            ],
        }
    )
    return Image(
        config=config,
        layers=blobs,
        manifest=manifest,
        manifest_digest=sha256(manifest),
        manifest_media_type=manifest_type,
        config_media_type=config_type,
        layer_media_type=layer_type,
        diff_ids=diff_ids,
        platform=platform,
        oci=oci,
        layer_format=layer_format,
        layer_digests=layer_digests,
    )


# -- a runnable image: the host's shell and the libraries it needs -------------------------

_GOARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def host_platform() -> str:
    """``linux/<GOARCH>`` of this machine (what its binaries run on)."""
    machine = os.uname().machine
    return f"linux/{_GOARCH.get(machine, machine)}"


def shared_libraries(binary: str) -> list[str]:
    """The absolute paths ``ldd binary`` lists (the dynamic loader included; not the vDSO).
    Empty for a static binary."""
    result = subprocess.run(
        ["ldd", binary], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        if "not a dynamic executable" in result.stdout + result.stderr:
            return []
        raise RuntimeError(f"ldd {binary} failed: {result.stderr.strip()}")
    paths: list[str] = []
    for line in result.stdout.splitlines():
        # "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        target = line.split("=>", 1)[1] if "=>" in line else line
        word = target.strip().split(" ", 1)[0]
        if word.startswith("/") and word not in paths:
            paths.append(word)
    return paths


def _shell_layer_tar(shell: str, seed: int) -> bytes:
    """A layer holding ``shell`` as ``bin/sh`` plus every library ``ldd`` lists, at the
    paths ``ldd`` names (symlinks resolved: regular files), and a file naming ``seed`` (so
    each seed gives a layer no runtime has seen)."""
    files: dict[str, tuple[bytes, int]] = {"bin/sh": (Path(shell).read_bytes(), 0o755)}
    for lib in shared_libraries(shell):
        files[lib.lstrip("/")] = (Path(lib).read_bytes(), 0o755)
    files["etc/p2pdist-shell-seed"] = (f"{seed}\n".encode(), 0o644)
    dirs: set[str] = set()
    for name in files:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    out = [_tar_dir(d + "/") for d in sorted(dirs)]
    out += [_tar_member(name, data, mode) for name, (data, mode) in sorted(files.items())]
    length = sum(len(p) for p in out) + 2 * tarfile.BLOCKSIZE
    out.append(b"\0" * (2 * tarfile.BLOCKSIZE + (-length % tarfile.RECORDSIZE)))
    return b"".join(out)


def make_shell_image(
    *,
    size: int = 0,
    layers: int = 0,
    seed: int = 0,
    oci: bool = False,
    shell: str = "/bin/dash",
) -> Image:
    """A runnable image: a first gzip layer with the host's ``shell`` as ``/bin/sh`` and the
    shared libraries it needs (so ``docker run IMAGE /bin/sh -c '...'`` works), then
    ``layers`` synthetic gzip layers holding ``size`` bytes in all (as :func:`make_image`).
    ``Cmd`` is ``["/bin/sh"]``; the platform is the host's (:func:`host_platform`).
    Deterministic for one host (the shell and libraries are the host's files)."""
    if layers < 0 or size < 0:
        raise ValueError("layers and size must be >= 0")
    if size and not layers:
        raise ValueError("size needs layers >= 1")
    tars = [_shell_layer_tar(shell, seed)]
    rng = random.Random(f"p2pdist-image:{seed}:gzip")
    per_layer = [size // layers + (1 if i < size % layers else 0) for i in range(layers)]
    tars += [_make_layer_tar(rng, i, n, "gzip") for i, n in enumerate(per_layer)]
    return _assemble_image(
        tars,
        layer_format="gzip",
        platform=host_platform(),
        oci=oci,
        seed=seed,
        history=[f"p2pdist shell layer ({shell} as /bin/sh)"]
        + [f"p2pdist synthetic layer {i}" for i in range(layers)],
    )


def make_index(images: Sequence[Image], *, oci: bool | None = None) -> tuple[bytes, str]:
    """A multi-platform index over ``images``: ``(bytes, digest)``.

    OCI image index if ``oci`` (default: the images' own kind), else a Docker manifest list.
    The registry needs the child manifests pushed (by digest) before the index.
    """
    if not images:
        raise ValueError("an index needs at least one image")
    if oci is None:
        oci = images[0].oci
    media_type = OCI_INDEX if oci else DOCKER_MANIFEST_LIST
    index = _dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {
                    "mediaType": im.manifest_media_type,
                    "size": len(im.manifest),
                    "digest": im.manifest_digest,
                    "platform": _parse_platform(im.platform),
                }
                for im in images
            ],
        }
    )
    return index, sha256(index)


def docker_save_tar(image: Image, repo_tag: str | None = None) -> bytes:
    """A ``docker load`` archive of ``image`` (manifest.json + config + layer blobs)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))

        config_name = image.config_digest.removeprefix("sha256:") + ".json"
        layer_names = []
        for digest, blob in zip(image.layer_digests, image.layers, strict=True):
            name = digest.removeprefix("sha256:") + "/layer.tar"
            layer_names.append(name)
            add(name, blob)
        add(config_name, image.config)
        entry = {
            "Config": config_name,
            "RepoTags": [repo_tag] if repo_tag else [],
            "Layers": layer_names,
        }
        add("manifest.json", json.dumps([entry]).encode())
    return buf.getvalue()


# -- pushing -------------------------------------------------------------------------------


class PushError(RuntimeError):
    """The registry refused an upload; the message holds its status and body."""


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer <token()>`` on every request (``token`` is called each time)."""

    def __init__(self, token: Callable[[], str]) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token()}"
        yield request


Auth = tuple[str, str] | Callable[[], str] | httpx.Auth | None


def _to_httpx_auth(auth: Auth) -> httpx.Auth | None:
    if auth is None or isinstance(auth, httpx.Auth):
        return auth
    if isinstance(auth, tuple):
        return httpx.BasicAuth(*auth)
    return BearerAuth(auth)


def _client(registry_url: str, auth: Auth) -> httpx.Client:
    return httpx.Client(
        base_url=registry_url.rstrip("/"),
        auth=_to_httpx_auth(auth),
        timeout=httpx.Timeout(60.0, connect=10.0),
        trust_env=False,  # loopback only: never route through an environment proxy
    )


def _check(resp: httpx.Response, what: str, ok: Iterable[int]) -> None:
    if resp.status_code not in ok:
        raise PushError(f"{what}: HTTP {resp.status_code}: {resp.text[:500]}")


def push_blob(
    registry_url: str,
    repo: str,
    data: bytes,
    *,
    digest: str | None = None,
    auth: Auth = None,
    client: httpx.Client | None = None,
) -> str:
    """Upload one blob (skipped if the registry has it) and return its digest.

    The real upload API: ``POST /v2/<repo>/blobs/uploads/`` → 202 ``Location``, then one
    monolithic ``PUT <location>?digest=…``.  ``digest`` defaults to sha256 of ``data``;
    passing a wrong one lets tests see the registry's ``DIGEST_INVALID``.
    """
    if client is None:
        with _client(registry_url, auth) as c:
            return push_blob(registry_url, repo, data, digest=digest, client=c)
    digest = digest or sha256(data)
    head = client.head(f"/v2/{repo}/blobs/{digest}")
    if head.status_code == 200:
        return digest
    start = client.post(f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    _check(start, f"POST /v2/{repo}/blobs/uploads/", (202,))
    location = start.headers.get("Location")
    if not location:
        raise PushError(f"POST /v2/{repo}/blobs/uploads/: 202 without a Location header")
    url = client.base_url.join(location).copy_merge_params({"digest": digest})
    put = client.put(url, content=data, headers={"Content-Type": "application/octet-stream"})
    _check(put, f"PUT blob {digest} to {repo}", (201,))
    return digest


def push_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    manifest: bytes,
    media_type: str,
    *,
    auth: Auth = None,
    client: httpx.Client | None = None,
) -> str:
    """``PUT /v2/<repo>/manifests/<reference>``; returns the registry's Docker-Content-Digest."""
    if client is None:
        with _client(registry_url, auth) as c:
            return push_manifest(registry_url, repo, reference, manifest, media_type, client=c)
    resp = client.put(
        f"/v2/{repo}/manifests/{reference}",
        content=manifest,
        headers={"Content-Type": media_type},
    )
    _check(resp, f"PUT manifest {repo}:{reference}", (201,))
    digest = resp.headers.get("Docker-Content-Digest") or sha256(manifest)
    if digest != sha256(manifest):
        raise PushError(f"registry stored manifest as {digest}, expected {sha256(manifest)}")
    return digest


def push_image(
    registry_url: str,
    repo: str,
    tag: str | None,
    image: Image,
    *,
    auth: Auth = None,
    client: httpx.Client | None = None,
) -> str:
    """Push blobs then the manifest (under ``tag``, or by digest if ``tag`` is None)."""
    if client is None:
        with _client(registry_url, auth) as c:
            return push_image(registry_url, repo, tag, image, client=c)
    for digest, data in image.blobs().items():
        push_blob(registry_url, repo, data, digest=digest, client=client)
    return push_manifest(
        registry_url,
        repo,
        tag or image.manifest_digest,
        image.manifest,
        image.manifest_media_type,
        client=client,
    )


def push_index(
    registry_url: str,
    repo: str,
    tag: str,
    images: Sequence[Image],
    *,
    oci: bool | None = None,
    auth: Auth = None,
) -> str:
    """Push every image by digest, then their index under ``tag``; returns the index digest."""
    with _client(registry_url, auth) as client:
        for image in images:
            push_image(registry_url, repo, None, image, client=client)
        index, _ = make_index(images, oci=oci)
        media_type = json.loads(index)["mediaType"]
        return push_manifest(registry_url, repo, tag, index, media_type, client=client)
