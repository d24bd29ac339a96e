"""End-to-end tests of ``p2pdist get`` as a user runs it: the real CLI in a subprocess
(``python -m p2pdist get …``) against real docker-registry processes on loopback, with the
fault proxy, the token server and a plain ``http.server`` as origins."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.image import Image, make_image, make_index, push_blob, push_image, push_index
from bench.localregistry import LocalRegistry, free_port
from tests.conftest import AUTH_PASSWORD, AUTH_USER
from tests.faultproxy import FaultProxy, RequestRecord
from tests.helpers import PushedImage, requires_registry
from tests.tokenserver import TokenRegistry

pytestmark = [pytest.mark.integration, requires_registry]

KIB = 1 << 10
MIB = 1 << 20
RUN_TIMEOUT = 60.0  # no single `p2pdist get` here should come close


# -- running the CLI -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    returncode: int
    stdout: bytes
    stderr: str
    seconds: float

    def __str__(self) -> str:  # shown by pytest when an assertion on the result fails
        return f"exit {self.returncode} after {self.seconds:.2f}s; stderr: {self.stderr!r}"


def clean_env(home: Path) -> dict[str, str]:
    """The caller's environment without anything that could change what `get` does:
    no P2PDIST_* settings, no HTTP proxies, no real ~/.docker/config.json."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("P2PDIST_") and not k.lower().endswith("_proxy")
    }
    env["HOME"] = str(home)
    env["DOCKER_CONFIG"] = str(home / ".docker")  # absent unless a test writes it
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    return env


class Cli:
    """Runs ``p2pdist get`` with a piece store and a home directory under ``tmp_path``."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.data_dir = tmp_path / "data"
        self.out_dir = tmp_path / "out"
        self.out_dir.mkdir()
        self.env = clean_env(self.home)

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "p2pdist",
            "get",
            *args,
            "--data-dir",
            str(self.data_dir),
            "--no-progress",
        ]

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = RUN_TIMEOUT
    ) -> Result:
        started = time.monotonic()
        proc = subprocess.run(
            self.argv(*args),
            env={**self.env, **(env or {})},
            cwd=self.tmp,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return Result(
            proc.returncode,
            proc.stdout,
            proc.stderr.decode(errors="replace"),
            time.monotonic() - started,
        )

    def out(self, name: str = "blob") -> Path:
        return self.out_dir / name

    def blob_file(self, digest: str) -> Path:
        return self.data_dir / "blobs" / "sha256" / digest.removeprefix("sha256:")


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    return sha256(path.read_bytes())


def assert_one_line_error(res: Result, *, secrets: Sequence[str] = ()) -> str:
    """stderr is exactly one line saying "error", no traceback, nothing on stdout."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, str(res)
    assert "Traceback" not in res.stderr, str(res)
    assert "error" in lines[0], str(res)
    assert "internal error" not in lines[0], str(res)
    assert res.stdout == b"", str(res)
    for secret in secrets:
        assert secret not in res.stderr
        assert secret.encode() not in res.stdout
    return lines[0]


def assert_dir_empty(directory: Path) -> None:
    """No output file and no leftover temp (``.part``) file."""
    assert sorted(p.name for p in directory.iterdir()) == []


def blob_gets(proxy: FaultProxy, digest: str) -> list[RequestRecord]:
    return proxy.records("GET", f"/blobs/{digest}")


def requested_bytes(records: Sequence[RequestRecord], size: int) -> int:
    """Bytes asked for by blob GETs (their ``Range``, else the whole blob)."""
    total = 0
    for rec in records:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rec.headers.get("range", ""))
        if m is None:
            total += size
        else:
            end = int(m.group(2)) if m.group(2) else size - 1
            total += end - int(m.group(1)) + 1
    return total


# -- blobs pushed for these tests -----------------------------------------------------------

BLOB_REPO = "cli/blobs"


@dataclass(frozen=True, slots=True)
class Blob:
    registry: LocalRegistry
    repo: str
    data: bytes
    digest: str

    def ref(self, host: str | None = None) -> str:
        return f"{host or self.registry.host}/{self.repo}@{self.digest}"

    def url(self, base: str | None = None) -> str:
        return f"{base or self.registry.url}/v2/{self.repo}/blobs/{self.digest}"


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(f"p2pdist-cli:{seed}").randbytes(size)


def pushed_blob(registry: LocalRegistry, size: int, seed: int) -> Blob:
    data = random_bytes(size, seed)
    digest = push_blob(registry.url, BLOB_REPO, data)
    return Blob(registry, BLOB_REPO, data, digest)


@pytest.fixture(scope="module")
def small_blob(registry: LocalRegistry) -> Blob:
    """300 KiB: a few pieces at the minimum piece size, one at the default."""
    return pushed_blob(registry, 300 * KIB + 17, seed=1)


@pytest.fixture(scope="module")
def medium_blob(registry: LocalRegistry) -> Blob:
    """~2 MiB: 33 pieces of 64 KiB."""
    return pushed_blob(registry, 2 * MIB + 123, seed=2)


@pytest.fixture(scope="module")
def big_blob(registry: LocalRegistry) -> Blob:
    """32 MiB: 32 pieces of 1 MiB, for the kill-and-resume test."""
    return pushed_blob(registry, 32 * MIB, seed=3)


def layer(pushed: PushedImage, i: int = 0) -> tuple[str, bytes]:
    image = pushed.image
    return image.layer_digests[i], image.layers[i]


# -- 1. blobs by digest, and the store ----------------------------------------------------


def test_every_blob_of_image_by_digest_is_verified(cli: Cli, pushed_image: PushedImage) -> None:
    blobs = pushed_image.image.blobs()
    assert len(blobs) == 4  # config + 3 layers
    for n, (digest, data) in enumerate(blobs.items()):
        out = cli.out(f"blob{n}")
        res = cli(f"{pushed_image.host}/{pushed_image.repo}@{digest}", "-O", str(out))
        assert res.returncode == 0, str(res)
        assert "verified" in res.stderr, str(res)
        assert digest in res.stderr, str(res)
        assert file_digest(out) == digest
        assert out.stat().st_size == len(data)
        assert cli.blob_file(digest).is_file()
    assert sorted(p.name for p in cli.out_dir.iterdir()) == [f"blob{n}" for n in range(4)]


def test_second_get_is_served_from_store(
    cli: Cli, fault_proxy: FaultProxy, pushed_image: PushedImage
) -> None:
    digest, data = layer(pushed_image, 1)
    ref = f"{fault_proxy.host}/{pushed_image.repo}@{digest}"
    first = cli(ref, "-O", str(cli.out("first")))
    assert first.returncode == 0, str(first)
    assert blob_gets(fault_proxy, digest), "the first get did not reach the registry"
    before = fault_proxy.count()

    second = cli(ref, "-O", str(cli.out("second")))
    assert second.returncode == 0, str(second)
    assert "verified" in second.stderr, str(second)
    assert "local store" in second.stderr, str(second)
    assert fault_proxy.count("GET", "/blobs/") == len(blob_gets(fault_proxy, digest))
    assert fault_proxy.records()[before:] == [], "the second get went to the registry"
    assert cli.out("second").read_bytes() == data


def test_store_not_poisoned_by_edited_then_deleted_export(
    cli: Cli, fault_proxy: FaultProxy, small_blob: Blob
) -> None:
    """The output file is a hard link to the store's blob.  A user who edits it in place
    (root ignores its read-only mode; anyone else can chmod it) and then deletes it must not
    get the edited bytes from the next ``get`` — and certainly not labelled "verified"."""
    ref = small_blob.ref(fault_proxy.host)
    first = cli(ref, "-O", str(cli.out("first")))
    assert first.returncode == 0, str(first)
    os.chmod(cli.out("first"), 0o644)
    with open(cli.out("first"), "r+b") as f:  # what an editor keeping hard links does
        f.seek(1000)
        f.write(b"EDITED")
    cli.out("first").unlink()

    second = cli(ref, "-O", str(cli.out("second")))
    assert second.returncode == 0, str(second)
    assert file_digest(cli.out("second")) == small_blob.digest, (
        f"`get` wrote bytes that do not match {small_blob.digest}; stderr: {second.stderr!r}"
    )


# -- 2. manifests ---------------------------------------------------------------------------


def test_manifest_by_tag_and_by_digest(cli: Cli, pushed_image: PushedImage) -> None:
    image = pushed_image.image
    by_tag = cli(pushed_image.reference, "--manifest", "-O", str(cli.out("tag.json")))
    assert by_tag.returncode == 0, str(by_tag)
    assert file_digest(cli.out("tag.json")) == pushed_image.digest
    assert pushed_image.digest in by_tag.stderr

    ref = f"{pushed_image.host}/{pushed_image.repo}@{pushed_image.digest}"
    by_digest = cli(ref, "--manifest", "-O", str(cli.out("digest.json")))
    assert by_digest.returncode == 0, str(by_digest)
    assert cli.out("digest.json").read_bytes() == image.manifest


@dataclass(frozen=True, slots=True)
class MultiPlatform:
    ref: str
    index: bytes
    index_digest: str
    images: dict[str, Image]


@pytest.fixture(scope="module")
def multi_platform(registry: LocalRegistry) -> MultiPlatform:
    images = {
        arch: make_image(size=2 * KIB, layers=1, seed=10 + i, platform=f"linux/{arch}")
        for i, arch in enumerate(("amd64", "arm64"))
    }
    digest = push_index(registry.url, "cli/multi", "v1", list(images.values()))
    index, expected = make_index(list(images.values()))
    assert digest == expected
    return MultiPlatform(f"{registry.host}/cli/multi:v1", index, digest, images)


def test_manifest_of_index_for_platform(cli: Cli, multi_platform: MultiPlatform) -> None:
    arm64 = multi_platform.images["arm64"]
    res = cli(multi_platform.ref, "--manifest", "--platform", "linux/arm64", "-O", str(cli.out()))
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == arm64.manifest
    assert file_digest(cli.out()) == arm64.manifest_digest
    assert arm64.manifest_digest in res.stderr


def test_manifest_of_index_without_platform_is_the_index(
    cli: Cli, multi_platform: MultiPlatform
) -> None:
    res = cli(multi_platform.ref, "--manifest", "-O", str(cli.out()))
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == multi_platform.index
    assert file_digest(cli.out()) == multi_platform.index_digest


# -- 3. Basic auth ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_image(auth_registry: LocalRegistry) -> Image:
    image = make_image(size=64 * KIB, layers=1, seed=20)
    push_image(auth_registry.url, "cli/private", "v1", image, auth=(AUTH_USER, AUTH_PASSWORD))
    return image


def auth_ref(reg: LocalRegistry, image: Image) -> str:
    return f"{reg.host}/cli/private@{image.layer_digests[0]}"


def test_basic_auth_from_environment(
    cli: Cli, auth_registry: LocalRegistry, auth_image: Image
) -> None:
    env = {"P2PDIST_REGISTRY_USERNAME": AUTH_USER, "P2PDIST_REGISTRY_PASSWORD": AUTH_PASSWORD}
    res = cli(auth_ref(auth_registry, auth_image), "-O", str(cli.out()), env=env)
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == auth_image.layers[0]
    assert AUTH_PASSWORD not in res.stderr


def test_basic_auth_wrong_password_exit_3_without_leaking_it(
    cli: Cli, auth_registry: LocalRegistry, auth_image: Image
) -> None:
    wrong = "wrong-Pa55word-3f9c1d"
    env = {"P2PDIST_REGISTRY_USERNAME": AUTH_USER, "P2PDIST_REGISTRY_PASSWORD": wrong}
    res = cli(auth_ref(auth_registry, auth_image), "-O", str(cli.out()), env=env)
    assert res.returncode == 3, str(res)
    basic = base64.b64encode(f"{AUTH_USER}:{wrong}".encode()).decode()
    assert_one_line_error(res, secrets=[wrong, basic])
    assert_dir_empty(cli.out_dir)


def test_anonymous_on_auth_registry_exit_3(
    cli: Cli, auth_registry: LocalRegistry, auth_image: Image
) -> None:
    res = cli(auth_ref(auth_registry, auth_image), "-O", str(cli.out()))
    assert res.returncode == 3, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)


@pytest.mark.parametrize("how", ["DOCKER_CONFIG", "docker_config key"])
def test_basic_auth_from_docker_config(
    cli: Cli, auth_registry: LocalRegistry, auth_image: Image, how: str
) -> None:
    docker_dir = cli.tmp / "docker-creds"
    docker_dir.mkdir()
    auth = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
    config_json = docker_dir / "config.json"
    config_json.write_text(json.dumps({"auths": {auth_registry.host: {"auth": auth}}}))
    args = [auth_ref(auth_registry, auth_image), "-O", str(cli.out())]
    env: dict[str, str] = {}
    if how == "DOCKER_CONFIG":
        env["DOCKER_CONFIG"] = str(docker_dir)
    else:
        toml = cli.tmp / "p2pdist.toml"
        toml.write_text(f"docker_config = {json.dumps(str(config_json))}\n")
        args += ["--config", str(toml)]
    res = cli(*args, env=env)
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == auth_image.layers[0]
    assert AUTH_PASSWORD not in res.stderr and auth not in res.stderr


# -- 4. Bearer tokens -------------------------------------------------------------------------


def test_bearer_token_registry_anonymous_pull(cli: Cli, token_registry: TokenRegistry) -> None:
    repo = "cli/token"
    image = make_image(size=128 * KIB, layers=1, seed=30)
    push_image(token_registry.url, repo, "v1", image, auth=lambda: token_registry.push_token(repo))
    tokens_before = token_registry.tokens.token_requests
    digest = image.layer_digests[0]
    res = cli(f"{token_registry.host}/{repo}@{digest}", "-O", str(cli.out()))
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == image.layers[0]
    new = token_registry.tokens.requests[tokens_before:]
    assert new, "the CLI never asked the token server for a token"
    assert all(r.account is None and r.status == 200 for r in new)
    assert any(f"repository:{repo}:pull" in s for r in new for s in r.scopes)


# -- 5. not found -----------------------------------------------------------------------------


def test_unknown_blob_digest_exit_3(cli: Cli, pushed_image: PushedImage) -> None:
    missing = sha256(b"never pushed anywhere")
    res = cli(f"{pushed_image.host}/{pushed_image.repo}@{missing}", "-O", str(cli.out()))
    assert res.returncode == 3, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)
    assert not cli.blob_file(missing).exists()


@pytest.mark.parametrize("what", ["repo", "tag"])
def test_unknown_manifest_exit_3(cli: Cli, pushed_image: PushedImage, what: str) -> None:
    ref = (
        f"{pushed_image.host}/no/such-repo:v1"
        if what == "repo"
        else f"{pushed_image.host}/{pushed_image.repo}:no-such-tag"
    )
    res = cli(ref, "--manifest", "-O", str(cli.out()))
    assert res.returncode == 3, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)


# -- 6. corruption ------------------------------------------------------------------------------


def test_corrupted_blob_exit_1_and_nothing_kept(
    cli: Cli, fault_proxy: FaultProxy, small_blob: Blob
) -> None:
    fault_proxy.flip_byte_in_blobs = True
    res = cli(small_blob.ref(fault_proxy.host), "-O", str(cli.out()))
    assert res.returncode == 1, str(res)
    line = assert_one_line_error(res)
    assert re.search(r"does not match|hashes to|mismatch", line), line
    assert any(r.fault == "flip" for r in blob_gets(fault_proxy, small_blob.digest))
    assert_dir_empty(cli.out_dir)
    assert not cli.blob_file(small_blob.digest).exists()


def test_failed_get_leaves_existing_output_untouched(
    cli: Cli, fault_proxy: FaultProxy, small_blob: Blob
) -> None:
    cli.out().write_bytes(b"previous contents")
    fault_proxy.flip_byte_in_blobs = True
    res = cli(small_blob.ref(fault_proxy.host), "-O", str(cli.out()))
    assert res.returncode == 1, str(res)
    assert cli.out().read_bytes() == b"previous contents"
    assert_dir_empty_but(cli.out_dir, "blob")


def test_interrupt_exit_130_and_no_output(
    cli: Cli, fault_proxy: FaultProxy, small_blob: Blob
) -> None:
    fault_proxy.rate_limit_next(1, retry_after=30)
    argv = cli.argv(small_blob.ref(fault_proxy.host), "-O", str(cli.out()))
    with subprocess.Popen(
        argv, env=cli.env, cwd=cli.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        try:
            deadline = time.monotonic() + 20
            while not any(r.fault == "rate_limit" for r in fault_proxy.records()):
                assert proc.poll() is None, "get ended before it was rate limited"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            proc.send_signal(signal.SIGINT)  # what Ctrl-C sends, during the 30 s wait
            stdout, stderr = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    res = Result(proc.returncode, stdout, stderr.decode(errors="replace"), 0.0)
    assert res.returncode == 130, str(res)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], str(res)
    assert "Traceback" not in res.stderr
    assert_dir_empty(cli.out_dir)


# -- 7. transient upstream errors -------------------------------------------------------------


def test_two_503_then_success(cli: Cli, fault_proxy: FaultProxy, small_blob: Blob) -> None:
    fault_proxy.fail_next(2, 503)
    res = cli(small_blob.ref(fault_proxy.host), "-O", str(cli.out()))
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == small_blob.data
    assert sum(r.fault == "fail" for r in fault_proxy.records()) == 2


def test_429_with_retry_after_then_success(
    cli: Cli, fault_proxy: FaultProxy, small_blob: Blob
) -> None:
    fault_proxy.rate_limit_next(1, retry_after=1)
    res = cli(small_blob.ref(fault_proxy.host), "-O", str(cli.out()))
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == small_blob.data
    assert sum(r.fault == "rate_limit" for r in fault_proxy.records()) == 1
    assert res.seconds >= 1.0, "Retry-After: 1 was not honoured"


# -- 8. broken connections ------------------------------------------------------------------


def test_cut_blob_bodies_are_retried_by_range(
    cli: Cli, fault_proxy: FaultProxy, medium_blob: Blob
) -> None:
    # 33 pieces of 64 KiB, 8 workers → spans of 2-3 pieces (128-192 KiB); every body is cut
    # after 96 KiB, so each span needs more than one request.
    fault_proxy.cut_blobs_after = 96 * KIB
    res = cli(medium_blob.ref(fault_proxy.host), "-O", str(cli.out()), "--piece-size", "64KiB")
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == medium_blob.data
    gets = blob_gets(fault_proxy, medium_blob.digest)
    assert len(gets) > 1
    assert any(r.fault == "cut" for r in gets)
    assert all("range" in r.headers for r in gets), "retries must be range requests"


def test_cut_blob_bodies_single_connection_resumes_by_range(
    cli: Cli, fault_proxy: FaultProxy, medium_blob: Blob
) -> None:
    """With ``--concurrency 1`` against a registry (which serves ranges), a connection
    that always breaks after 96 KiB must not stop a ~2 MiB blob: each retry should ask for
    the rest (``Range``), not start again from byte 0."""
    fault_proxy.cut_blobs_after = 96 * 1024
    res = cli(
        medium_blob.ref(fault_proxy.host),
        "-O",
        str(cli.out()),
        "--piece-size",
        "64KiB",
        "--concurrency",
        "1",
    )
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == medium_blob.data
    gets = blob_gets(fault_proxy, medium_blob.digest)
    assert any(r.fault == "cut" for r in gets)
    ranges = [r.headers.get("range", "") for r in gets]
    assert all(rng.startswith("bytes=") for rng in ranges), ranges
    # A broken range is retried from its first unfinished piece: byte 0 is asked for once.
    assert sum(rng.startswith("bytes=0-") for rng in ranges) == 1, ranges


# -- 9. kill and resume -----------------------------------------------------------------------


class KillingProxy(FaultProxy):
    """A FaultProxy that SIGKILLs ``victim`` when the ``kill_at``-th GET of a path containing
    ``path`` arrives, and answers that request 503 (the client is gone anyway)."""

    def __init__(self, upstream_url: str, *, path: str, kill_at: int) -> None:
        super().__init__(upstream_url)
        self.path = path
        self.kill_at = kill_at
        self.victim: int | None = None
        self.killed = threading.Event()
        self._seen = 0
        self._kill_lock = threading.Lock()

    def _take_fault(self, rec: RequestRecord) -> tuple[str, int, dict[str, str]] | None:
        fault = super()._take_fault(rec)
        if rec.method != "GET" or self.path not in rec.path:
            return fault
        with self._kill_lock:
            self._seen += 1
            if self._seen == self.kill_at and self.victim is not None:
                os.kill(self.victim, signal.SIGKILL)
                self.killed.set()
                return "fail", 503, {}
        return fault


def test_killed_get_resumes_from_verified_pieces(
    cli: Cli, registry: LocalRegistry, big_blob: Blob
) -> None:
    size = len(big_blob.data)
    flags = ["--piece-size", "1MiB", "--concurrency", "2"]
    # 32 pieces, 2 workers → 4 range requests of 8 MiB.  The 3rd request starts once one
    # worker has finished its 8 MiB; the other is then near the end of its own 8 MiB.
    with KillingProxy(registry.url, path=f"/blobs/{big_blob.digest}", kill_at=3) as proxy:
        with subprocess.Popen(
            cli.argv(big_blob.ref(proxy.host), "-O", str(cli.out()), *flags),
            env=cli.env,
            cwd=cli.tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as proc:
            proxy.victim = proc.pid
            try:
                rc = proc.wait(timeout=RUN_TIMEOUT)
            finally:
                if proc.poll() is None:
                    proc.kill()
        assert proxy.killed.is_set(), f"the get finished (exit {rc}) before it could be killed"
        assert rc == -signal.SIGKILL
        assert_dir_empty(cli.out_dir)
        assert not cli.blob_file(big_blob.digest).exists()
        first_run = len(proxy.records())

        res = cli(big_blob.ref(proxy.host), "-O", str(cli.out()), *flags)
        assert res.returncode == 0, str(res)
        assert file_digest(cli.out()) == big_blob.digest
        second = [
            r
            for r in proxy.records()[first_run:]
            if r.method == "GET" and big_blob.digest in r.path
        ]
    fetched = requested_bytes(second, size)
    # One worker's whole 8 MiB span had been received before the kill (the 3rd GET is its
    # next span).  At most concurrency + 2 = 4 received pieces wait for (or are in) a
    # writer thread at any moment, so at least 4 MiB of that span were verified and on
    # disk: the second run must not fetch them again (typically 6-13 MiB are reused).
    assert 0 < fetched <= size - 4 * MIB, f"second run fetched {fetched} of {size} bytes"
    assert all("range" in r.headers for r in second)


# -- 10. bad input --------------------------------------------------------------------------


def test_malformed_digest_in_reference_exit_2(cli: Cli, pushed_image: PushedImage) -> None:
    res = cli(f"{pushed_image.host}/{pushed_image.repo}@sha256:xyz", "-O", str(cli.out()))
    assert res.returncode == 2, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)


def test_invalid_reference_uppercase_repo_exit_2(cli: Cli, pushed_image: PushedImage) -> None:
    digest, _ = layer(pushed_image)
    res = cli(f"{pushed_image.host}/Test/App@{digest}", "-O", str(cli.out()))
    assert res.returncode == 2, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)


def test_malformed_digest_flag_exit_2(cli: Cli, small_blob: Blob) -> None:
    res = cli(small_blob.url(), "--digest", "sha256:xyz", "-O", str(cli.out()))
    assert res.returncode == 2, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)


def test_output_in_missing_directory_exit_2_nothing_fetched(
    cli: Cli, fault_proxy: FaultProxy, small_blob: Blob
) -> None:
    target = cli.out_dir / "no-such-dir" / "blob"
    res = cli(small_blob.ref(fault_proxy.host), "-O", str(target))
    assert res.returncode == 2, str(res)
    assert_one_line_error(res)
    assert fault_proxy.records() == []
    assert_dir_empty(cli.out_dir)
    assert not cli.blob_file(small_blob.digest).exists()


def test_output_is_a_directory_exit_2(cli: Cli, fault_proxy: FaultProxy, small_blob: Blob) -> None:
    res = cli(small_blob.ref(fault_proxy.host), "-O", str(cli.out_dir))
    assert res.returncode == 2, str(res)
    assert_one_line_error(res)
    assert fault_proxy.records() == []
    assert_dir_empty(cli.out_dir)


def test_piece_size_below_minimum_exit_2(cli: Cli, small_blob: Blob) -> None:
    res = cli(small_blob.ref(), "-O", str(cli.out()), "--piece-size", "1KiB")
    assert res.returncode == 2, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)


def test_closed_port_exit_4_quickly(cli: Cli) -> None:
    port = free_port()
    res = cli(f"127.0.0.1:{port}/cli/blobs@{sha256(b'x')}", "-O", str(cli.out()))
    assert res.returncode == 4, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)
    assert res.seconds < 15, f"connection refused took {res.seconds:.1f}s to report"


# -- 11. plain URLs ----------------------------------------------------------------------------


def test_url_with_digest(cli: Cli, small_blob: Blob) -> None:
    res = cli(small_blob.url(), "--digest", small_blob.digest, "-O", str(cli.out()))
    assert res.returncode == 0, str(res)
    assert "verified" in res.stderr
    assert cli.out().read_bytes() == small_blob.data
    assert cli.blob_file(small_blob.digest).is_file()


def test_url_with_wrong_digest_exit_1(cli: Cli, small_blob: Blob) -> None:
    wrong = sha256(small_blob.data + b"!")
    res = cli(small_blob.url(), "--digest", wrong, "-O", str(cli.out()))
    assert res.returncode == 1, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)
    assert not cli.blob_file(wrong).exists()


def test_url_without_digest_warns_and_prints_sha256(cli: Cli, small_blob: Blob) -> None:
    res = cli(small_blob.url(), "-O", str(cli.out()))
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == small_blob.data
    assert "not be verified" in res.stderr or "not verified" in res.stderr, str(res)
    assert small_blob.digest.removeprefix("sha256:") in res.stderr, str(res)
    assert_dir_empty_but(cli.out_dir, "blob")


def test_url_without_digest_does_not_claim_verified(
    cli: Cli, fault_proxy: FaultProxy, small_blob: Blob
) -> None:
    """Without ``--digest`` nothing is checked: here the origin corrupts the body, and the
    CLI must not call the result "verified" (it warns, then prints the sha256)."""
    fault_proxy.flip_byte_in_blobs = True
    res = cli(small_blob.url(fault_proxy.url), "-O", str(cli.out()))
    assert res.returncode == 0, str(res)
    assert file_digest(cli.out()) != small_blob.digest  # the corruption went through
    assert file_digest(cli.out()).removeprefix("sha256:") in res.stderr, str(res)
    claims = [
        line
        for line in res.stderr.splitlines()
        if re.search(r"\bverified\b", line) and not re.search(r"not (be )?verified", line)
    ]
    assert claims == [], f"unverified content reported as verified: {claims}"


def assert_dir_empty_but(directory: Path, *names: str) -> None:
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)


class QuietFileHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def no_range_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """Python's ``http.server`` on 127.0.0.1 serving a directory: it ignores ``Range``."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietFileHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("verified", [True, False], ids=["digest", "no-digest"])
def test_url_from_server_without_range_support(
    cli: Cli, no_range_server: tuple[str, Path], verified: bool
) -> None:
    base, root = no_range_server
    data = random_bytes(MIB + 4321, seed=40)
    (root / "file.bin").write_bytes(data)
    args = [f"{base}/file.bin", "-O", str(cli.out()), "--piece-size", "64KiB"]
    if verified:
        args += ["--digest", sha256(data)]
    res = cli(*args)
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == data
    assert_dir_empty_but(cli.out_dir, "blob")


def test_url_not_found_exit_3(cli: Cli, registry: LocalRegistry) -> None:
    missing = sha256(b"no such blob")
    res = cli(f"{registry.url}/v2/{BLOB_REPO}/blobs/{missing}", "-O", str(cli.out()))
    assert res.returncode == 3, str(res)
    assert_one_line_error(res)
    assert_dir_empty(cli.out_dir)


def test_url_extra_header_reaches_server(
    cli: Cli, fault_proxy: FaultProxy, small_blob: Blob
) -> None:
    res = cli(
        small_blob.url(fault_proxy.url),
        "--digest",
        small_blob.digest,
        "-H",
        "X-Test: 1",
        "-O",
        str(cli.out()),
    )
    assert res.returncode == 0, str(res)
    assert cli.out().read_bytes() == small_blob.data
    records = fault_proxy.records()
    assert any(r.method == "GET" for r in records)
    assert all(r.headers.get("x-test") == "1" for r in records), [
        (r.method, r.headers) for r in records
    ]


# -- 12. stdout -------------------------------------------------------------------------------


def test_output_dash_writes_blob_to_stdout(cli: Cli, small_blob: Blob) -> None:
    res = cli(small_blob.ref(), "-O", "-")
    assert res.returncode == 0, str(res)
    assert res.stdout == small_blob.data
    assert "verified" in res.stderr
    assert_dir_empty(cli.out_dir)


def test_output_dash_writes_manifest_to_stdout(cli: Cli, pushed_image: PushedImage) -> None:
    res = cli(pushed_image.reference, "--manifest", "-O", "-")
    assert res.returncode == 0, str(res)
    assert res.stdout == pushed_image.image.manifest
