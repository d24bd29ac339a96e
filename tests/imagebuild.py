"""Building the p2pdist container image where no base image can be pulled.

* :func:`debian_base_tar` — a minimal Debian bookworm with ``python3`` and ``python3-venv``
  (bookworm's python3 is 3.11), made with ``debootstrap --variant=minbase``, trimmed and
  tarred; cached under :data:`CACHE_DIR` (``/var/cache/p2pdist-ci``, or
  ``$P2PDIST_CI_CACHE``) so local reruns skip the ~30 s debootstrap.
* :func:`wheelhouse` — the project's dependencies (``[project] dependencies`` and the
  build backend from ``pyproject.toml``) as wheels, fetched once with ``pip download`` on
  the host and cached by the list's hash.
* :func:`serve_directory` — a loopback HTTP server over a directory: the wheelhouse, for
  the image build's ``pip`` (``PIP_NO_INDEX=1``, ``PIP_FIND_LINKS=http://127.0.0.1:PORT/``),
  so the build itself downloads nothing.
* :func:`build_image` — ``docker import`` of the base, then ``docker build`` of the repo's
  ``Dockerfile`` (the real build context, with its ``.dockerignore``) with
  ``--build-arg BASE=…`` on a private dockerd (:class:`bench.dockerd.Dockerd`).

``--network host`` for the build: the private dockerd runs with ``--bridge=none``, and the
build's ``pip`` must reach the wheel server on the host's loopback.  BuildKit when the CLI
has it (see :func:`_build_cli`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.dockerd import Dockerd, DockerdError

__all__ = [
    "CACHE_DIR",
    "DEBOOTSTRAP_MISSING_REASON",
    "REPO_ROOT",
    "BuildTimes",
    "build_image",
    "debian_base_tar",
    "serve_directory",
    "wheelhouse",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("P2PDIST_CI_CACHE", "/var/cache/p2pdist-ci"))
DEBIAN_MIRROR = os.environ.get("P2PDIST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBOOTSTRAP_MISSING_REASON = "debootstrap not installed: apt-get install debootstrap"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv")
# What a container never needs from the base (docs, man pages, translations, apt's lists
# and package cache): about half of a minbase system with Python.
_TRIM = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (two test runs build one cache entry, not two)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def debian_base_tar(*, timeout: float = 600.0) -> Path:
    """The cached tarball of a minimal Debian bookworm with Python 3 (made when missing)."""
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(PACKAGES)} {DEBIAN_MIRROR}".encode())
    tar = CACHE_DIR / f"debian-{SUITE}-python3-{key.hexdigest()[:12]}.tar"
    with _locked(tar.with_suffix(".lock")):
        if tar.exists():
            return tar
        work = Path(tempfile.mkdtemp(prefix="p2pdist-base-", dir=CACHE_DIR))
        try:
            root = work / "root"
            subprocess.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    SUITE,
                    str(root),
                    DEBIAN_MIRROR,
                ],
                check=True,
                capture_output=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
            for rel in _TRIM:
                target = root / rel
                if target.is_dir():
                    shutil.rmtree(target)
                    target.mkdir()
            partial = work / "base.tar"
            subprocess.run(
                ["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."],
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            os.replace(partial, tar)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tar


def _requirements() -> list[str]:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    deps: list[str] = pyproject["project"]["dependencies"]
    build: list[str] = pyproject["build-system"]["requires"]
    return sorted({*deps, *build})


def wheelhouse(*, timeout: float = 600.0) -> Path:
    """A directory of wheels for the project's dependencies and build backend (cached)."""
    reqs = _requirements()
    key = hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:12]
    dest = CACHE_DIR / f"wheels-{key}"
    with _locked(CACHE_DIR / f"wheels-{key}.lock"):
        if (dest / ".complete").exists():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--only-binary=:all:",
                "--dest",
                str(dest),
                *reqs,
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        (dest / ".complete").write_text("\n".join(reqs) + "\n")
    return dest


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT/`` serving ``directory`` (listing and files) until exit."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _cli_version(cli: str) -> tuple[int, ...]:
    out = subprocess.run(
        [cli, "version", "--format", "{{.Client.Version}}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    ).stdout
    try:
        return tuple(int(p) for p in out.strip().split("+")[0].split(".")[:2])
    except ValueError:
        return ()


def _build_cli() -> tuple[str, bool]:
    """The docker CLI to build with, and whether it can use BuildKit.

    BuildKit builds the image in ~15 s here; the legacy builder creates a container per
    instruction, which on dockerd's vfs driver copies the whole root filesystem each time
    (60-350 s).  A CLI before 23.0 (Debian's docker.io) has BuildKit built in; later ones
    need the buildx plugin.  Without either, the legacy builder.
    """
    candidates = [c for c in (shutil.which("docker"), "/usr/bin/docker") if c]
    for cli in dict.fromkeys(candidates):
        if not os.access(cli, os.X_OK):
            continue
        buildx = subprocess.run(
            [cli, "buildx", "version"], capture_output=True, timeout=30, check=False
        )
        if buildx.returncode == 0 or (0,) < _cli_version(cli) < (23,):
            return cli, True
    return candidates[0] if candidates else "docker", False


@dataclass(frozen=True, slots=True)
class BuildTimes:
    """Seconds spent in each step of :func:`build_image` (reported by the test)."""

    base: float
    wheels: float
    imported: float
    built: float


def build_image(
    d: Dockerd, tag: str, *, base_tag: str = "p2pdist-base:test", timeout: float = 900.0
) -> BuildTimes:
    """Import the Debian base into ``d`` and build the repo's Dockerfile as ``tag``."""
    t0 = time.monotonic()
    base = debian_base_tar()
    t1 = time.monotonic()
    wheels = wheelhouse()
    t2 = time.monotonic()
    with open(base, "rb") as f:
        result = subprocess.run(
            d.docker_argv("import", "-", base_tag),
            stdin=f,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=d.cli_env,
        )
    if result.returncode != 0:
        raise DockerdError(f"docker import failed: {result.stderr}\n{d.log_tail()}")
    t3 = time.monotonic()
    cli, buildkit = _build_cli()
    with serve_directory(wheels) as wheel_url:
        env = {**d.cli_env, "DOCKER_BUILDKIT": "1" if buildkit else "0"}
        argv = d.docker_argv(
            "build",
            "--network",
            "host",
            "--build-arg",
            f"BASE={base_tag}",
            "--build-arg",
            "PIP_NO_INDEX=1",
            "--build-arg",
            f"PIP_FIND_LINKS={wheel_url}",
            "--tag",
            tag,
            str(REPO_ROOT),
        )
        argv[0] = cli
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    if result.returncode != 0:
        raise DockerdError(
            f"docker build failed ({result.returncode}):\n{result.stdout[-6000:]}"
            f"{result.stderr[-3000:]}"
        )
    return BuildTimes(base=t1 - t0, wheels=t2 - t1, imported=t3 - t2, built=time.monotonic() - t3)
