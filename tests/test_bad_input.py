"""Bad input, everywhere a stranger or a typo can reach (issue 6, part 2).

Every bad input gets a 4xx (an OCI error body from the proxy), a one-line CLI error with
exit 2, or - for well-formed events about pieces that do not exist - the scheduler's own
refusal (``Ack.rejected`` / ``Rejected``); never a traceback, a 500 or a hang.

* Real servers on loopback - the registry proxy, the peer server and the local API of a
  daemon (:func:`p2pdist.daemon.open_daemon`), and a scheduler
  (:func:`scheduler.service.serve_scheduler`) - run in a background thread for the whole
  module; the tests talk to them with plain sockets, byte for byte.
* Property-based tests (hypothesis) drive the parsers and the scheduler's event handling
  with generated input.
* The CLI (``python -m p2pdist ...``) with malformed arguments and config files; the runs
  are made in parallel once per module, each case asserted by its own test.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.image import push_blob
from bench.localregistry import LocalRegistry
from p2pdist.config import NodeConfig
from p2pdist.daemon import DaemonInfo, open_daemon
from p2pdist.digest import Digest
from p2pdist.errors import InvalidDigest, InvalidReference, ManifestInvalid
from p2pdist.httpserver import RangeNotSatisfiable, parse_range
from p2pdist.peer import PIECE_PATH, parse_piece_path
from p2pdist.reference import MAX_NAME_LENGTH, is_valid_repository, parse_reference
from p2pdist.registry import (
    MAX_MANIFEST_SIZE,
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    Index,
    parse_manifest,
)
from scheduler import SchedulerConfig
from scheduler._codec import decode_event
from scheduler._core import Scheduler
from scheduler._events import Ack, Assignment, Rejected, Unknown
from scheduler.service import MAX_EVENT_BYTES, serve_scheduler
from tests.faultproxy import BackgroundHTTPServer, FaultProxy

PIECE = 64 * 1024
NO_DOCKER_CONFIG = Path("/nonexistent/p2pdist-test/config.json")
HEX = "0123456789abcdef"
D0 = "sha256:" + "0" * 64  # valid, and no registry has it
TIMEOUT = 10.0  # no exchange here should take more than a fraction of this

# -- servers in a background thread -----------------------------------------------------


@dataclass(frozen=True)
class Addr:
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Addr:
        host, _, port = url.removeprefix("http://").rpartition(":")
        return cls(host, int(port))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Servers:
    """A scheduler and one daemon (proxy, peer server, local API), served by ``trio.run``
    in a thread, so that every test of the module can talk to them with plain sockets."""

    def __init__(self, root: Path, upstream: str | None) -> None:
        self.root = root
        self.upstream = upstream
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.info: DaemonInfo | None = None
        self.servers: dict[str, Addr] = {}

    def __enter__(self) -> Servers:
        self._thread = threading.Thread(target=self._run, name="bad-input-servers", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise TimeoutError("servers did not start in 30 s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(15)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            sched = await nursery.start(partial(serve_scheduler, "127.0.0.1", 0))
            config = NodeConfig(
                data_dir=self.root / "data",
                peer_listen="127.0.0.1:0",
                api_listen="127.0.0.1:0",
                proxy_listen="127.0.0.1:0",
                upstream=self.upstream,
                piece_size=PIECE,
                host_id=f"bad-input-{self.root.name}",
                docker_config=NO_DOCKER_CONFIG,
                schedulers=(sched.url,),
            )
            async with open_daemon(config) as info:
                assert info.proxy_url is not None
                self.info = info
                self.servers = {
                    "proxy": Addr.of(info.proxy_url),
                    "peer": Addr.of(info.peer_url),
                    "api": Addr.of(info.api_url),
                    "scheduler": Addr.of(sched.url),
                }
                self._ready.set()
                await self._stop.wait()
            nursery.cancel_scope.cancel()

    @property
    def node_store(self) -> Path:
        return self.root / "data" / "blobs" / "sha256"


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Servers with no upstream registry (nothing here needs one)."""
    with Servers(tmp_path_factory.mktemp("bare"), None) as servers:
        yield servers


@dataclass
class Upstreamed:
    servers: Servers
    upstream: FaultProxy
    registry: LocalRegistry


@pytest.fixture(scope="module")
def upstreamed(
    registry: LocalRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Upstreamed]:
    """Servers whose proxy pulls from the ``registry`` fixture through a FaultProxy (which
    counts what reaches the upstream)."""
    with (
        FaultProxy(registry.url) as upstream,
        Servers(tmp_path_factory.mktemp("upstreamed"), upstream.url) as servers,
    ):
        yield Upstreamed(servers, upstream, registry)


# -- raw HTTP over a plain socket ------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated name keeps the last value
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"


def exchange(addr: Addr, data: bytes, *, timeout: float = TIMEOUT) -> bytes:
    """Send ``data`` on a new connection; return everything the server sends until it
    closes.  A server that neither answers nor closes fails the test (socket timeout)."""
    with socket.create_connection((addr.host, addr.port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        out = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                return bytes(out)
            out += chunk
            if time.monotonic() > deadline:
                raise TimeoutError(f"{addr}: still sending after {timeout} s")
    return bytes(out)


def parse_replies(data: bytes, *, no_body: bool = False) -> list[Reply]:
    """The responses in ``data`` (Content-Length or chunked framing; ``no_body``: answers
    to HEAD)."""
    replies = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"truncated response head: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        m = re.fullmatch(r"HTTP/1\.[01] (\d{3}) ?.*", lines[0])
        assert m is not None, f"not a status line: {lines[0]!r}"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if no_body:
            body, data = b"", rest
        elif "content-length" in headers:
            n = int(headers["content-length"])
            body, data = rest[:n], rest[n:]
            assert len(body) == n, f"body shorter than its Content-Length: {headers}"
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body_parts = []
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    data = rest.partition(b"\r\n")[2]
                    break
                body_parts.append(rest[:size])
                rest = rest[size + 2 :]
            body = b"".join(body_parts)
        else:
            body, data = rest, b""
        replies.append(Reply(int(m.group(1)), headers, body))
    return replies


def request(
    addr: Addr,
    target: str | bytes,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> Reply:
    """One request, sent byte for byte (no client-side normalising of the target)."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: test", b"Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}".encode())
    if body or method in ("POST", "PUT"):
        lines.append(b"Content-Length: %d" % len(body))
    data = b"\r\n".join(lines) + b"\r\n\r\n" + body
    replies = parse_replies(exchange(addr, data), no_body=method == "HEAD")
    assert len(replies) == 1, replies
    return replies[0]


def assert_error_body(reply: Reply, code: str | set[str] | None = None) -> str:
    """A registry-style JSON error body; returns its code."""
    assert reply.headers.get("content-type", "").startswith("application/json"), reply
    doc = reply.json()
    assert isinstance(doc, dict) and isinstance(doc.get("errors"), list), doc
    err = doc["errors"][0]
    assert isinstance(err["code"], str) and isinstance(err["message"], str), doc
    if code is not None:
        assert err["code"] in ({code} if isinstance(code, str) else code), doc
    return str(err["code"])


def assert_still_serving(servers: Servers) -> None:
    for name, addr in servers.servers.items():
        reply = request(addr, "/healthz")
        assert reply.status == 200, (name, reply)


# -- 1. garbage on the wire, to every server ---------------------------------------------------

GOOD_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"

#: (name, bytes, statuses allowed).  Each is sent on a new connection to every server.
GARBAGE: list[tuple[str, bytes, set[int]]] = [
    ("malformed request line", b"THIS IS NOT HTTP\r\n\r\n", {400}),
    ("lowercase method and version", b"get / http/1.1\r\nHost: x\r\n\r\n", {400}),
    ("double spaces in the request line", b"GET  /  HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("HTTP/0.9 simple request", b"GET /\r\n\r\n", {400}),
    ("HTTP/2 preface on HTTP/1.1", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {505}),
    ("unknown HTTP version", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", {505}),
    ("empty lines only", b"\r\n\r\n\r\n", {400}),
    ("header without colon", GOOD_HEAD + b"NoColonHere\r\n\r\n", {400}),
    ("space before the colon", b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", {400}),
    ("NUL in the target", b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("NUL in a header value", GOOD_HEAD + b"X-A: a\x00b\r\n\r\n", {400}),
    ("byte 0xff in the target", b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", {400}),
    ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", {400}),
    ("two Host headers", GOOD_HEAD + b"Host: y\r\n\r\n", {400}),
    ("oversized header value", GOOD_HEAD + b"X-A: " + b"a" * 70_000 + b"\r\n\r\n", {431}),
    ("too many headers", GOOD_HEAD + b"X-N: v\r\n" * 12_000 + b"\r\n", {431}),
    ("oversized request line", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {431}),
    ("head never ending", GOOD_HEAD + b"X-A: " + b"a" * 100_000, {431}),
    ("Content-Length not a number", GOOD_HEAD + b"Content-Length: banana\r\n\r\n", {400}),
    ("negative Content-Length", GOOD_HEAD + b"Content-Length: -1\r\n\r\n", {400}),
    ("two Content-Lengths", GOOD_HEAD + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", {400}),
    (
        "1000-digit Content-Length",
        GOOD_HEAD + b"Content-Length: 1" + b"0" * 999 + b"\r\n\r\n",
        {400},
    ),
    ("unknown transfer coding", GOOD_HEAD + b"Transfer-Encoding: gzip\r\n\r\n", {501}),
    ("TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)), {400}),
]


@pytest.mark.parametrize(("name", "data", "statuses"), GARBAGE, ids=[g[0] for g in GARBAGE])
def test_garbage_is_answered_and_closed_on_every_server(
    bare: Servers, name: str, data: bytes, statuses: set[int]
) -> None:
    for server, addr in bare.servers.items():
        started = time.monotonic()
        replies = parse_replies(exchange(addr, data))
        assert len(replies) == 1, (server, name, replies)
        reply = replies[0]
        assert reply.status in statuses, (server, name, reply)
        assert reply.closes, (server, name, reply.headers)
        assert_error_body(reply)
        assert time.monotonic() - started < 5, (server, name, "slow to answer and close")
    assert_still_serving(bare)


#: Requests h11 parses, with a body that is wrong or too large.  The servers answer (a 4xx:
#: the path does not exist, or the scheduler refuses the body) and close the connection
#: at once instead of waiting ``read_timeout`` for the rest.
def _bad_body_cases(server: str) -> list[tuple[str, bytes]]:
    target = b"/api/v1/events" if server == "scheduler" else b"/no/such/path"
    head = b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n"
    big = MAX_EVENT_BYTES + 1 if server == "scheduler" else 2_000_000  # > 1 MiB drain limit
    return [
        ("huge Content-Length", head + b"Content-Length: 99999999999999999999\r\n\r\n"),
        ("a body past what is read or drained", head + b"Content-Length: %d\r\n\r\n{" % big),
        ("invalid chunked body", head + b"Transfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n"),
        ("chunk size overflow", head + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\n"),
        (
            "Content-Length and Transfer-Encoding (smuggling)",
            head
            + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
    ]


@pytest.mark.parametrize("server", ["proxy", "peer", "api", "scheduler"])
def test_bad_request_bodies_get_a_4xx_and_the_connection_closed(bare: Servers, server: str) -> None:
    addr = bare.servers[server]
    for name, data in _bad_body_cases(server):
        started = time.monotonic()
        replies = parse_replies(exchange(addr, data))
        # Exactly one answer: the smuggled second request is never read.
        assert len(replies) == 1, (name, replies)
        assert 400 <= replies[0].status < 500, (name, replies[0])
        assert_error_body(replies[0])
        if server == "scheduler":
            assert replies[0].status in (400, 413), (name, replies[0])
        assert time.monotonic() - started < 3, (name, "the server waited for the body")
    assert_still_serving(bare)


@pytest.mark.parametrize("server", ["proxy", "peer", "api", "scheduler"])
def test_pipelined_garbage_after_a_good_request(bare: Servers, server: str) -> None:
    data = GOOD_HEAD + b"\r\n" + b"GARBAGE \x00\x01\x02\r\n\r\n" + GOOD_HEAD + b"\r\n"
    replies = parse_replies(exchange(bare.servers[server], data))
    assert [r.status for r in replies] == [200, 400], replies
    assert replies[1].closes
    assert_error_body(replies[1])
    assert_still_serving(bare)


# -- 2. names, digests, tags and methods on the proxy --------------------------------------

BLOB_REPO = "bad/input"


def _blob_bytes(seed: int, size: int = 150_017) -> bytes:
    return random.Random(f"bad-input:{seed}").randbytes(size)


@pytest.fixture(scope="module")
def pushed(upstreamed: Upstreamed) -> tuple[bytes, str]:
    data = _blob_bytes(0)
    return data, push_blob(upstreamed.registry.url, BLOB_REPO, data)


def _names(digest: str) -> list[tuple[str, str]]:
    """(what, raw request target) for blobs under a repository name the spec forbids."""
    long_component = "a" * (MAX_NAME_LENGTH + 1)
    long_path = "/".join(["abcdefghij" * 5] * 6)  # 305 characters in valid components
    return [
        ("dot-dot component", f"/v2/bad/../input/blobs/{digest}"),
        ("percent-encoded dot-dot", f"/v2/bad/%2e%2e/input/blobs/{digest}"),
        ("percent-encoded dot-dot, uppercase", f"/v2/bad/%2E%2E/input/blobs/{digest}"),
        ("encoded slashes and dot-dots", f"/v2/bad%2f..%2f..%2finput/blobs/{digest}"),
        ("dot component", f"/v2/./input/blobs/{digest}"),
        ("empty component (//)", f"/v2/bad//input/blobs/{digest}"),
        ("leading slash", f"/v2//bad/input/blobs/{digest}"),
        ("trailing slash", f"/v2/bad/input//blobs/{digest}"),
        ("uppercase", f"/v2/Bad/Input/blobs/{digest}"),
        ("leading dash", f"/v2/-bad/input/blobs/{digest}"),
        ("trailing separator", f"/v2/bad/input_/blobs/{digest}"),
        ("encoded NUL", f"/v2/bad/input%00/blobs/{digest}"),
        ("encoded space", f"/v2/bad%20input/blobs/{digest}"),
        ("backslash", f"/v2/bad\\input/blobs/{digest}"),
        ("over 255 characters", f"/v2/{long_component}/blobs/{digest}"),
        ("over 255 characters in valid components", f"/v2/{long_path}/blobs/{digest}"),
        ("dot-dot in a manifest's name", "/v2/bad/../input/manifests/v1"),
        ("uppercase in a manifest's name", "/v2/BAD/manifests/v1"),
        ("dot-dot in tags/list", "/v2/bad/%2e%2e/tags/list"),
    ]


def test_proxy_refuses_invalid_repository_names_without_asking_upstream(
    upstreamed: Upstreamed, pushed: tuple[bytes, str]
) -> None:
    _, digest = pushed
    proxy, api = upstreamed.servers.servers["proxy"], upstreamed.servers.servers["api"]
    before = upstreamed.upstream.count()
    for what, target in _names(digest):
        for addr in (proxy, api):  # the local API serves the same /v2/ routes
            reply = request(addr, target)
            assert reply.status == 400, (what, target, reply)
            assert_error_body(reply, "NAME_INVALID")
            assert reply.headers["docker-distribution-api-version"] == "registry/2.0"
    assert upstreamed.upstream.count() == before, "an invalid name reached the upstream"


def test_proxy_refuses_invalid_digests_and_tags(
    upstreamed: Upstreamed, pushed: tuple[bytes, str]
) -> None:
    proxy = upstreamed.servers.servers["proxy"]
    before = upstreamed.upstream.count()
    cases = [
        ("blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        ("blobs/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),  # uppercase hex
        ("blobs/sha256:" + "a" * 63, 400, "DIGEST_INVALID"),
        ("blobs/sha256:" + "a" * 65, 400, "DIGEST_INVALID"),
        ("blobs/sha256:", 400, "DIGEST_INVALID"),
        ("blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("blobs/sha256%3a" + "g" * 64, 400, "DIGEST_INVALID"),
        ("blobs/" + "a" * 64, 400, "DIGEST_INVALID"),  # no algorithm
        ("blobs/sha256:..%2f..%2f..%2fetc%2fpasswd", 404, "UNSUPPORTED"),  # not a route
        ("manifests/sha256:xyz", 400, "DIGEST_INVALID"),
        ("manifests/..", 400, "TAG_INVALID"),
        ("manifests/%2e%2e", 400, "TAG_INVALID"),
        ("manifests/-v1", 400, "TAG_INVALID"),
        ("manifests/.v1", 400, "TAG_INVALID"),
        ("manifests/" + "v" * 129, 400, "TAG_INVALID"),
        ("manifests/v1%00", 400, "TAG_INVALID"),
    ]
    for ref, status, code in cases:
        reply = request(proxy, f"/v2/{BLOB_REPO}/{ref}")
        assert reply.status == status, (ref, reply)
        assert_error_body(reply, code)
    assert upstreamed.upstream.count() == before, "an invalid digest or tag reached upstream"


def test_proxy_unknown_digests_are_404_oci_errors(
    upstreamed: Upstreamed, pushed: tuple[bytes, str]
) -> None:
    proxy = upstreamed.servers.servers["proxy"]
    for method in ("GET", "HEAD"):
        reply = request(proxy, f"/v2/{BLOB_REPO}/blobs/{D0}", method=method)
        assert reply.status == 404, (method, reply)
        if method == "GET":
            assert_error_body(reply, "BLOB_UNKNOWN")
        reply = request(proxy, f"/v2/{BLOB_REPO}/manifests/{D0}", method=method)
        assert reply.status == 404, (method, reply)
        if method == "GET":
            assert_error_body(reply, "MANIFEST_UNKNOWN")
    reply = request(proxy, "/v2/bad/no-such-repo/manifests/v1")
    assert reply.status == 404
    assert_error_body(reply, {"MANIFEST_UNKNOWN", "NAME_UNKNOWN"})
    # sha512 is a digest we verify: valid, and unknown
    reply = request(proxy, f"/v2/{BLOB_REPO}/blobs/sha512:{'0' * 128}")
    assert reply.status == 404
    assert_error_body(reply, "BLOB_UNKNOWN")


def test_proxy_refuses_writes_bad_ns_and_unknown_routes(
    upstreamed: Upstreamed, pushed: tuple[bytes, str]
) -> None:
    proxy = upstreamed.servers.servers["proxy"]
    _, digest = pushed
    before = upstreamed.upstream.count()
    for method, target in [
        ("POST", f"/v2/{BLOB_REPO}/blobs/uploads/"),
        ("PUT", f"/v2/{BLOB_REPO}/manifests/v1"),
        ("DELETE", f"/v2/{BLOB_REPO}/blobs/{digest}"),
        ("PATCH", f"/v2/{BLOB_REPO}/blobs/uploads/x"),
    ]:
        reply = request(proxy, target, method=method, body=b"{}")
        assert reply.status == 405, (method, reply)
        assert_error_body(reply, "UNSUPPORTED")
        assert reply.headers["allow"] == "GET, HEAD"
    for ns in ("evil%20host", "a/b", "user@host", "host:99999999", "%00", "-bad.example"):
        reply = request(proxy, f"/v2/{BLOB_REPO}/blobs/{D0}?ns={ns}")
        assert reply.status == 400, (ns, reply)
        assert_error_body(reply, "NAME_INVALID")
    for target in ("/v2/_catalog", "/v2/bad/input/referrers/x", "/v3/", "/", "/v2/bad/input"):
        reply = request(proxy, target)
        assert reply.status == 404, (target, reply)
        assert_error_body(reply)
    assert upstreamed.upstream.count() == before


# -- 3. ranges: proxy blobs (streamed and from the store), peer blob ranges ------------------

SIZE = 150_017

#: (Range header, status, (start, end) for a 206) for a blob of SIZE bytes.  Syntactically
#: invalid ranges, inverted ones and multi-range requests are ignored (200, the whole blob:
#: RFC 9110 §14.2 lets a server ignore them); a single range starting at or past the end,
#: or ``bytes=-0``, is 416 with ``Content-Range: bytes */SIZE``.
RANGES: list[tuple[str, int, tuple[int, int] | None]] = [
    ("bytes=0-99", 206, (0, 100)),
    ("bytes=100-", 206, (100, SIZE)),
    ("bytes=-100", 206, (SIZE - 100, SIZE)),
    (f"bytes=-{SIZE * 2}", 206, (0, SIZE)),
    (f"bytes={SIZE - 1}-{SIZE - 1}", 206, (SIZE - 1, SIZE)),
    ("bytes=0-99999999999999999999", 206, (0, SIZE)),
    (" bytes = 7 - 9 ", 206, (7, 10)),
    (f"bytes={SIZE}-", 416, None),
    (f"bytes={SIZE + 5}-{SIZE + 10}", 416, None),
    ("bytes=99999999999999999999999-", 416, None),
    ("bytes=-0", 416, None),
    ("bytes=5-1", 200, None),  # inverted
    ("bytes=abc", 200, None),
    ("bytes=", 200, None),
    ("bytes=-", 200, None),
    ("bytes=1-2-3", 200, None),
    ("bytes=0x10-0x20", 200, None),
    ("bytes=١-٢", 200, None),  # Arabic-Indic digits
    ("bytes=0-1,5-6", 200, None),  # multi-range
    ("bytes=0-0,-1", 200, None),
    ("items=0-5", 200, None),
    ("garbage", 200, None),
]


def check_range_reply(reply: Reply, data: bytes, header: str, status: int, rng: Any) -> None:
    size = len(data)
    assert reply.status == status, (header, reply.status, reply.body[:200])
    if status == 206:
        start, end = rng
        assert reply.headers["content-range"] == f"bytes {start}-{end - 1}/{size}", header
        assert int(reply.headers["content-length"]) == end - start, header
        assert reply.body == data[start:end], header
    elif status == 416:
        assert reply.headers["content-range"] == f"bytes */{size}", header
        assert_error_body(reply, "RANGE_NOT_SATISFIABLE")
    else:
        assert "content-range" not in reply.headers, header
        assert int(reply.headers["content-length"]) == size, header
        assert hashlib.sha256(reply.body).digest() == hashlib.sha256(data).digest(), header


def test_proxy_and_peer_ranges(upstreamed: Upstreamed) -> None:
    servers = upstreamed.servers.servers
    for i, (header, status, rng) in enumerate(RANGES):
        data = _blob_bytes(100 + i, SIZE)
        digest = push_blob(upstreamed.registry.url, BLOB_REPO, data)
        path = f"/v2/{BLOB_REPO}/blobs/{digest}"
        # The first request starts the download: the range is cut from the stream.
        check_range_reply(
            request(servers["proxy"], path, headers={"Range": header}), data, header, status, rng
        )
        blob = upstreamed.servers.node_store / digest.removeprefix("sha256:")
        deadline = time.monotonic() + TIMEOUT
        while not blob.exists():
            assert time.monotonic() < deadline, f"{digest} never completed"
            time.sleep(0.02)
        # Then from the store (sendfile), on the proxy, the local API and the peer server.
        for where, target in [
            ("proxy", path),
            ("api", path),
            ("peer", f"/peer/v1/blobs/{digest}"),
        ]:
            reply = request(servers[where], target, headers={"Range": header})
            check_range_reply(reply, data, f"{where}: {header}", status, rng)


def test_peer_server_refuses_malformed_piece_requests(bare: Servers) -> None:
    peer = bare.servers["peer"]
    d = D0
    cases: list[tuple[str, int]] = [
        (f"/peer/v1/blobs/sha256:zz/pieces/0?piece_size={PIECE}", 400),
        (f"/peer/v1/blobs/{d.upper()}/pieces/0?piece_size={PIECE}", 400),
        (f"/peer/v1/blobs/{d}/pieces/-1?piece_size={PIECE}", 400),
        (f"/peer/v1/blobs/{d}/pieces/1e3?piece_size={PIECE}", 400),
        (f"/peer/v1/blobs/{d}/pieces/{'9' * 30}?piece_size={PIECE}", 400),
        (f"/peer/v1/blobs/{d}/pieces/%EF%BC%91?piece_size={PIECE}", 400),  # fullwidth 1
        (f"/peer/v1/blobs/{d}/pieces/0", 400),  # no piece_size
        (f"/peer/v1/blobs/{d}/pieces/0?piece_size=0", 400),
        (f"/peer/v1/blobs/{d}/pieces/0?piece_size=-1", 400),
        (f"/peer/v1/blobs/{d}/pieces/0?piece_size=abc", 400),
        (f"/peer/v1/blobs/{d}/pieces/0?piece_size={1 << 31}", 400),
        (f"/peer/v1/blobs/{d}/pieces/0?piece_size={'9' * 5000}", 400),
        (f"/peer/v1/blobs/{d}/pieces/0?piece_size={PIECE}", 404),  # valid, not here
        (f"/peer/v1/blobs/{d}", 404),
        ("/peer/v1/blobs/sha256:zz", 400),
        ("/peer/v1/blobs/../../../etc/passwd", 404),
        ("/peer/v1/blobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd", 404),
        ("/peer/v1/blobs/sha256:..%2f..%2fetc%2fpasswd", 404),
        (f"/peer/v1/blobs/{d}/pieces/0/../../../x", 404),
        ("/etc/passwd", 404),
        ("/", 404),
    ]
    for target, status in cases:
        reply = request(peer, target)
        assert reply.status == status, (target, reply)
        assert_error_body(reply)
    for method in ("PUT", "DELETE"):
        reply = request(peer, f"/peer/v1/blobs/{d}/pieces/0?piece_size={PIECE}", method=method)
        assert reply.status == 405, (method, reply)
        reply = request(peer, f"/peer/v1/blobs/{d}", method=method)
        assert reply.status == 405, (method, reply)


def test_local_api_refuses_malformed_requests(bare: Servers) -> None:
    api = bare.servers["api"]
    for target, status in [
        ("/api/v1/blobs/sha256:zz", 400),
        ("/api/v1/blobs/sha256:zz/stats", 400),
        (f"/api/v1/blobs/{D0}/stats", 404),
        (f"/api/v1/blobs/{D0}", 400),  # neither registry+repository nor url
        (f"/api/v1/blobs/{D0}?registry=127.0.0.1:5000", 400),
        (f"/api/v1/blobs/{D0}?registry=bad%20host&repository=x", 400),
        (f"/api/v1/blobs/{D0}?registry=127.0.0.1:5000&repository=../../x", 400),
        (f"/api/v1/blobs/{D0}?registry=127.0.0.1:5000&repository=Up/Per", 400),
        (f"/api/v1/blobs/{D0}?url=file:///etc/passwd", 400),
        (f"/api/v1/blobs/{D0}?url=ftp://127.0.0.1/x", 400),
        (f"/api/v1/blobs/{D0}?url=not%20a%20url", 400),
        ("/api/v1/other", 404),
    ]:
        reply = request(api, target)
        assert reply.status == status, (target, reply)
        assert_error_body(reply)
    reply = request(api, f"/api/v1/blobs/{D0}?url=http://127.0.0.1:1/x", method="DELETE")
    assert reply.status == 405


# -- 4. oversized and malformed manifests from the upstream ---------------------------------

BIG_MANIFEST = 5 << 20


class _ManifestHandler(BaseHTTPRequestHandler):
    """An "upstream registry" serving bad manifests:
    ``/v2/big/sized/...``: 5 MiB with a Content-Length; ``/v2/big/chunked/...``: 5 MiB
    chunked; ``/v2/big/endless/...``: a chunked body that never ends; ``/v2/big/nested/...``:
    1 MiB of ``[[[[...``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        owner: ManifestUpstream = self.server.owner  # type: ignore[attr-defined]
        kind = self.path.split("/")[3] if self.path.count("/") >= 4 else ""
        if not self.path.startswith("/v2/big/") or "/manifests/" not in self.path:
            self.send_response(404 if self.path != "/v2/" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        owner.requests.append(kind)
        self.send_response(200)
        self.send_header("Content-Type", MEDIA_OCI_MANIFEST)
        if kind == "nested":
            body = b'{"schemaVersion":2,"config":' + b"[" * (1 << 20) + b"}"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if kind == "sized":
            self.send_header("Content-Length", str(BIG_MANIFEST))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b" " * (64 << 10)
        sent = 0
        try:
            while kind == "endless" or sent < BIG_MANIFEST:
                if kind == "sized":
                    self.wfile.write(chunk)
                else:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                owner.sent = max(owner.sent, sent)
                if sent > 64 * BIG_MANIFEST:  # the client never hung up: stop anyway
                    break
            if kind != "sized":
                self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


class ManifestUpstream(BackgroundHTTPServer):
    handler_class = _ManifestHandler

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[str] = []
        self.sent = 0


@pytest.fixture(scope="module")
def manifest_upstream() -> Iterator[ManifestUpstream]:
    with ManifestUpstream() as up:
        yield up


async def test_proxy_caps_oversized_manifests(
    tmp_path: Path, manifest_upstream: ManifestUpstream
) -> None:
    config = NodeConfig(
        data_dir=tmp_path / "data",
        peer_listen="127.0.0.1:0",
        api_listen="127.0.0.1:0",
        proxy_listen="127.0.0.1:0",
        upstream=manifest_upstream.url,
        piece_size=PIECE,
        host_id="manifests",
        docker_config=NO_DOCKER_CONFIG,
    )
    async with (
        open_daemon(config) as info,
        httpx.AsyncClient(base_url=str(info.proxy_url), timeout=30, trust_env=False) as c,
    ):
        for kind in ("sized", "chunked", "endless"):
            manifest_upstream.sent = 0
            with trio.fail_after(20):
                r = await c.get(f"/v2/big/{kind}/manifests/v1")
            assert r.status_code == 502, (kind, r.status_code, r.text[:200])
            assert r.json()["errors"][0]["message"].endswith(
                f"larger than {MAX_MANIFEST_SIZE} bytes"
            )
            # Not buffered without bound: the proxy stopped reading soon after the cap.
            assert manifest_upstream.sent < MAX_MANIFEST_SIZE + (8 << 20), (
                kind,
                manifest_upstream.sent,
            )
        # 1 MiB of nesting: passed through as bytes (the proxy forwards what hashes to its
        # digest), never a 500 from a parser's recursion limit.
        r = await c.get("/v2/big/nested/manifests/v1")
        assert r.status_code == 200, r.text[:200]
        assert (
            r.headers["docker-content-digest"] == "sha256:" + hashlib.sha256(r.content).hexdigest()
        )


def test_parse_manifest_refuses_deep_nesting_and_oversize() -> None:
    for data in (
        b"[" * 100_000,
        b'{"schemaVersion":2,"mediaType":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"schemaVersion":2,"config":' + b"{" * 50_000,
        b" " * (MAX_MANIFEST_SIZE + 1),
    ):
        with pytest.raises(ManifestInvalid):
            parse_manifest(data, MEDIA_OCI_MANIFEST)


# -- 5. the scheduler's events endpoint -----------------------------------------------------


def post_event(addr: Addr, body: bytes | dict[str, Any]) -> Reply:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(
        addr,
        "/api/v1/events",
        method="POST",
        headers={"Content-Type": "application/json"},
        body=raw,
    )


def test_scheduler_refuses_malformed_events_with_400(bare: Servers) -> None:
    sched = bare.servers["scheduler"]
    digest = "sha256:" + "1" * 64
    start = {"type": "StartTask", "host_id": "h", "digest": digest, "size": 1, "piece_size": PIECE}
    bodies: list[tuple[str, bytes | dict[str, Any]]] = [
        ("empty", b""),
        ("not JSON", b"this is not json"),
        ("invalid UTF-8", b'{"type": "\xff\xfe"}'),
        ("truncated", b'{"type": "Assign", "host_id": '),
        ("a list", b"[]"),
        ("a string", b'"RegisterHost"'),
        ("null", b"null"),
        ("no type", {}),
        ("unknown type", {"type": "DropTables"}),
        ("type of the wrong type", {"type": 5}),
        ("an answer, not an event", {"type": "Ack"}),
        ("missing fields", {"type": "RegisterHost"}),
        ("unknown field", {**start, "admin": True}),
        ("size is a string", {**start, "size": "big"}),
        ("size is a float", {**start, "size": 1.5}),
        ("size is a bool", {**start, "size": True}),
        ("size beyond 2**63", {**start, "size": 10**30}),
        ("size beyond a float", {**start, "size": 10**400}),
        (
            "pieces not a list",
            {"type": "ReportPieces", "host_id": "h", "digest": digest, "pieces": 3},
        ),
        (
            "piece a string",
            {"type": "ReportPieces", "host_id": "h", "digest": digest, "pieces": ["x"]},
        ),
        (
            "hashes keyed by non-integers",
            {
                "type": "ReportPieces",
                "host_id": "h",
                "digest": digest,
                "pieces": [0],
                "hashes": {"a": "b"},
            },
        ),
        (
            "unknown failure reason",
            {
                "type": "ReportPieceFailure",
                "host_id": "h",
                "digest": digest,
                "parent_id": None,
                "piece": 0,
                "reason": "x",
            },
        ),
        (
            "load with a huge number",
            b'{"type":"Heartbeat","host_id":"h","load":{"up_bps":1' + b"0" * 400 + b"}}",
        ),
        ("load with 1e400 (inf)", b'{"type":"Heartbeat","host_id":"h","load":{"cpu":1e400}}'),
        ("NaN", b'{"type":"Heartbeat","host_id":"h","load":{"cpu":NaN}}'),
        ("Infinity", b'{"type":"Heartbeat","host_id":"h","load":{"cpu":-Infinity}}'),
        ("deep nesting", b"[" * 200_000),
        ("deep nesting in a field", b'{"type":"Heartbeat","host_id":"h","load":' + b"{" * 100_000),
        ("string too long", {"type": "LeaveHost", "host_id": "h" * 5000}),
    ]
    for what, body in bodies:
        reply = post_event(sched, body)
        assert reply.status == 400, (what, reply)
        assert_error_body(reply)
        assert len(reply.body) < 1024, (what, "error message not bounded")
    reply = post_event(sched, b" " * (MAX_EVENT_BYTES + 1))
    assert reply.status == 413
    assert request(sched, "/api/v1/events").status == 405
    assert_still_serving(bare)


def test_scheduler_answers_reports_of_pieces_that_do_not_exist(bare: Servers) -> None:
    """Well-formed events about pieces that do not exist are refused in the answer (the
    protocol's ``Ack.rejected`` and ``Rejected``, status 200, so that the daemon drops
    them) and change nothing: no hash is published and nobody is offered those pieces."""
    sched = bare.servers["scheduler"]
    digest = "sha256:" + "2" * 64
    count = 10
    h = "ab" * 32

    def event(**kw: Any) -> Any:
        reply = post_event(sched, kw)
        assert reply.status == 200, (kw, reply)
        return reply.json()

    for host in ("liar", "asker"):
        assert event(type="RegisterHost", host_id=host, addr="127.0.0.1:9")["type"] == "Ack"
        ack = event(
            type="StartTask", host_id=host, digest=digest, size=count * PIECE, piece_size=PIECE
        )
        assert ack["type"] == "Ack"
    bogus = [-1, count, count + 1, 2**31, 2**63 - 1, -(2**63 - 1)]
    ack = event(
        type="ReportPieces",
        host_id="liar",
        digest=digest,
        pieces=bogus,
        hashes={str(i): h for i in (count, count + 1, 2**31)},  # JSON keys are strings
        source=True,
    )
    assert ack["type"] == "Ack" and sorted(ack["rejected"]) == sorted(bogus)
    for piece in (-1, count, 2**40):
        answer = event(
            type="ReportPieceFailure",
            host_id="liar",
            digest=digest,
            parent_id="asker",
            piece=piece,
            reason="bad_hash",
        )
        assert answer["type"] == "Rejected" and answer["reason"] == "invalid", answer
    answer = event(type="CompleteTask", host_id="liar", digest=digest, hashes={str(count): h})
    assert answer["type"] == "Ack"
    # other malformed-but-decodable events
    for kw in (
        {
            "type": "StartTask",
            "host_id": "liar",
            "digest": "sha256:xyz",
            "size": 1,
            "piece_size": PIECE,
        },
        {"type": "StartTask", "host_id": "liar", "digest": digest, "size": -1, "piece_size": PIECE},
        {"type": "StartTask", "host_id": "liar", "digest": digest, "size": 1, "piece_size": 1},
        {
            "type": "StartTask",
            "host_id": "liar",
            "digest": digest,
            "size": 2**62,
            "piece_size": PIECE,
        },
        {"type": "RegisterHost", "host_id": "x", "addr": "no port"},
        {"type": "RegisterHost", "host_id": "", "addr": "127.0.0.1:1"},
    ):
        assert event(**kw)["type"] == "Rejected", kw
    assert event(type="Assign", host_id="stranger", digest=digest) == {
        "type": "Unknown",
        "kind": "host",
    }
    # The liar's CompleteTask made it a seed of a task whose hashes nobody published: the
    # asker is offered no piece from it (every piece goes to the registry first).
    plan = event(type="Assign", host_id="asker", digest=digest, max_pieces=count)
    assert plan["type"] == "Assignment" and plan["from_peers"] == [], plan
    assert plan["piece_hashes"] == {}, plan
    assert all(0 <= i < count for i in plan["from_source"]), plan


# -- 6. property-based: parsers and the scheduler's event handling ------------------------

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_digits = st.integers(min_value=0, max_value=10**25).map(str)
_range_spec = st.one_of(
    st.tuples(_digits, st.just("-"), _digits).map("".join),
    st.tuples(_digits, st.just("-")).map("".join),
    st.tuples(st.just("-"), _digits).map("".join),
    st.text(alphabet="0123456789-, =abx\t", max_size=20),
)
_range_header = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.tuples(
        st.sampled_from(["bytes=", "BYTES=", "bytes =", " bytes= ", "items=", "bytes"]),
        st.lists(_range_spec, min_size=1, max_size=3).map(",".join),
    ).map("".join),
)


@PROPERTY
@given(_range_header, st.one_of(st.integers(0, 1000), st.integers(0, 1 << 64)))
def test_parse_range_answers_a_range_in_bounds_none_or_416(header: str | None, size: int) -> None:
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiable as exc:
        assert exc.status == 416 and exc.size == size
        assert ("Content-Range", f"bytes */{size}") in exc.headers
        return
    if got is not None:
        start, end = got
        assert 0 <= start < end <= size, (header, size, got)
        # a single well-formed first-last range means exactly what it says
        m = re.fullmatch(
            r"\s*bytes\s*=\s*(\d+)\s*-\s*(\d+)\s*", header or "", re.IGNORECASE | re.ASCII
        )
        if m is not None:
            assert got == (int(m[1]), min(int(m[2]) + 1, size))


_component = st.one_of(
    st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)*", fullmatch=True),
    st.sampled_from(["..", ".", "", "A", "%2e%2e", "a__b", "a--b", "-a", "a-", "a" * 300, "a/b"]),
)
_references = st.tuples(
    st.sampled_from(
        [
            "",
            "127.0.0.1:5000/",
            "registry.example/",
            "localhost/",
            "[::1]:5000/",
            "a..b/",
            "127.0.0.1:99999/",
            "ex ample/",
            "docker.io/",
        ]
    ),
    st.lists(_component, min_size=1, max_size=4).map("/".join),
    st.sampled_from(
        [
            "",
            ":v1",
            ":",
            ":-x",
            ":" + "t" * 129,
            ":a/b",
            "@sha256:" + "a" * 64,
            "@sha256:zz",
            ":v1@sha256:" + "b" * 64,
            "@",
            "//",
        ]
    ),
).map("".join)


@PROPERTY
@given(st.one_of(_references, st.text(max_size=300)))
def test_parse_reference_raises_only_invalid_reference(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReference:
        return
    assert is_valid_repository(ref.repository) and len(ref.repository) <= MAX_NAME_LENGTH
    parts = ref.repository.split("/")
    assert all(p and p not in (".", "..") and p == p.lower() for p in parts), ref
    assert parse_reference(str(ref)) == ref


@PROPERTY
@given(
    st.one_of(
        st.text(max_size=140),
        st.tuples(
            st.sampled_from(["sha256", "sha512", "SHA256", "md5", "", "sha256 "]),
            st.sampled_from([":", "", "::"]),
            st.text(alphabet=HEX + "ABCDEFg/.", min_size=0, max_size=130),
        ).map("".join),
    )
)
def test_digest_parse_raises_only_invalid_digest(text: str) -> None:
    try:
        d = Digest.parse(text)
    except InvalidDigest:
        return
    assert str(d) == text
    assert len(d.hex) == {"sha256": 64, "sha512": 128}[d.algorithm]
    assert set(d.hex) <= set(HEX)


_json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=15,
)
_digests = st.one_of(
    st.sampled_from(["sha256:" + "a" * 64, "sha512:" + "b" * 128, "sha256:xyz", "", D0]), _json
)
_descriptor = st.fixed_dictionaries(
    {},
    optional={
        "mediaType": st.one_of(st.sampled_from([MEDIA_OCI_MANIFEST, "x/y", ""]), _json),
        "digest": _digests,
        "size": st.one_of(st.integers(-5, 1 << 70), _json),
        "platform": st.one_of(
            st.fixed_dictionaries(
                {}, optional={"os": _json_scalars, "architecture": _json_scalars, "variant": _json}
            ),
            _json,
        ),
    },
)
_manifest_doc = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.one_of(st.just(2), _json),
        "mediaType": st.one_of(
            st.sampled_from(
                [MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX, MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_LIST]
            ),
            _json,
        ),
        "config": st.one_of(_descriptor, _json),
        "layers": st.one_of(st.lists(_descriptor, max_size=3), _json),
        "manifests": st.one_of(st.lists(_descriptor, max_size=3), _json),
    },
)


@PROPERTY
@given(
    st.one_of(
        _manifest_doc.map(lambda d: json.dumps(d).encode()),
        _json.map(lambda d: json.dumps(d).encode()),
    ),
    st.sampled_from(
        ["", MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, "application/json", "x/y; a=b"]
    ),
)
def test_parse_manifest_raises_only_manifest_invalid(data: bytes, media_type: str) -> None:
    try:
        parsed = parse_manifest(data, media_type)
    except ManifestInvalid:
        return
    descs = parsed.manifests if isinstance(parsed, Index) else [parsed.config, *parsed.layers]
    for desc in descs:
        assert isinstance(desc.digest, Digest)
        assert isinstance(desc.size, int) and not isinstance(desc.size, bool) and desc.size >= 0


_paths = st.one_of(
    st.text(max_size=120),
    st.tuples(
        st.sampled_from(
            ["/peer/v1/blobs/", "/peer/v1/blob/", "peer/v1/blobs/", "/peer/v1/blobs//"]
        ),
        _digests.filter(lambda d: isinstance(d, str)).map(str),
        st.sampled_from(["/pieces/", "/piece/", "/pieces//", "/"]),
        st.one_of(
            st.integers(-5, 10**12).map(str),
            st.sampled_from(["", "0x1", "١", "1.0", " 1", "01", "9" * 10]),
        ),
        st.sampled_from(["", "/", "/x"]),
    ).map("".join),
)


@PROPERTY
@given(_paths)
def test_parse_piece_path_is_none_a_piece_or_a_clear_error(path: str) -> None:
    try:
        got = parse_piece_path(path)
    except (InvalidDigest, ValueError):
        return
    if got is None:
        return
    digest, index = got
    assert 0 <= index < 10**9
    prefix, _, index_text = path.rpartition("/")
    assert f"{prefix}/{{index}}" == PIECE_PATH.format(digest=digest, index="{index}")
    assert index_text.isascii() and int(index_text) == index


_EVENT_TYPES = [
    "RegisterHost",
    "Heartbeat",
    "LeaveHost",
    "StartTask",
    "Announce",
    "ReportPieces",
    "ReportPieceFailure",
    "CompleteTask",
    "BlobMismatch",
    "LeaveTask",
    "Assign",
]
_EV_DIGEST = "sha256:" + "c" * 64
_ints = st.one_of(
    st.integers(-3, 12),
    st.integers(),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), 10**400, PIECE]),
)
_ev_fields = {
    "host_id": st.sampled_from(["h0", "h1", "h2", ""]),
    "addr": st.sampled_from(["127.0.0.1:1", "x", "[::1]:2"]),
    "digest": st.sampled_from([_EV_DIGEST, "sha256:xyz"]),
    "size": _ints,
    "piece_size": _ints,
    "pieces": st.lists(_ints, max_size=5),
    "piece": _ints,
    "max_pieces": _ints,
    "epoch": st.one_of(st.none(), _ints),
    "hashes": st.one_of(
        st.none(),
        st.dictionaries(
            st.one_of(_ints, st.sampled_from(["0", "1", "x"])),
            st.sampled_from(["ab" * 32, "zz"]),
            max_size=4,
        ),
    ),
    "source": st.booleans(),
    "complete": st.booleans(),
    "parent_id": st.one_of(st.none(), st.sampled_from(["h0", "h1", "h9"])),
    "reason": st.sampled_from(["bad_hash", "error", "slow", "refused", "x"]),
    "upload_slots": _ints,
    "load": st.dictionaries(
        st.sampled_from(["cpu", "up_bps", "rss", "x"]), st.one_of(_ints, st.floats())
    ),
    "zone": st.text(max_size=3),
    "labels": st.dictionaries(st.text(max_size=3), _json_scalars, max_size=2),
}
_events = st.one_of(
    st.builds(
        lambda t, fields, extra: {"type": t, **fields, **extra},
        st.sampled_from(_EVENT_TYPES),
        st.fixed_dictionaries({}, optional=_ev_fields),  # type: ignore[arg-type]
        st.dictionaries(st.text(max_size=3), _json, max_size=1),
    ),
    _json,
)


@PROPERTY
@given(st.lists(_events, max_size=25))
def test_decode_and_handle_never_raise_beyond_value_error(events: list[Any]) -> None:
    s = Scheduler(SchedulerConfig(heartbeat_timeout=5.0), seed=3)
    for host in ("h0", "h1"):  # give the generated events a swarm to act on
        s.handle(
            decode_event({"type": "RegisterHost", "host_id": host, "addr": "127.0.0.1:9"}), 0.0
        )
        s.handle(
            decode_event(
                {
                    "type": "StartTask",
                    "host_id": host,
                    "digest": _EV_DIGEST,
                    "size": 10 * PIECE + 1,
                    "piece_size": PIECE,
                }
            ),
            0.0,
        )
    now = 0.0
    for raw in events:
        now += 0.5
        try:
            event = decode_event(raw)
        except ValueError:
            continue
        answer = s.handle(event, now)
        assert isinstance(answer, Ack | Unknown | Rejected | Assignment), answer
        if isinstance(answer, Assignment):
            task = s.tasks[_EV_DIGEST]
            assert all(0 <= p.piece < task.count for p in answer.from_peers)
            assert all(0 <= i < task.count for i in answer.from_source)
        if isinstance(answer, Ack):
            assert all(isinstance(i, int) for i in answer.rejected)
    for task in s.tasks.values():
        assert all(h is None or re.fullmatch("[0-9a-f]{64}", h) for h in task.hashes)


def test_codec_refuses_out_of_range_numbers() -> None:
    heartbeat = {"type": "Heartbeat", "host_id": "h", "load": {}}
    for load in ({"up_bps": 10**400}, {"cpu": math.inf}, {"cpu": math.nan}, {"rss": 2**63}):
        with pytest.raises(ValueError):
            decode_event({**heartbeat, "load": load})
    event = decode_event({**heartbeat, "load": {"up_bps": 2**62, "rss": 2**63 - 1}})
    assert event.load.rss == 2**63 - 1  # type: ignore[union-attr]


# -- 7. the CLI: malformed arguments and config files -------------------------------------

BLOB = "127.0.0.1:1/cli/blob@" + "sha256:" + "e" * 64
IMAGE = "127.0.0.1:1/cli/image:v1"


_CONFIGS = {
    "invalid-toml": "concurrency = \n",
    "unknown-key": "concurrency = 2\nbogus = 1\n",
    "concurrency-string": 'concurrency = "many"\n',
    "concurrency-bool": "concurrency = true\n",
    "concurrency-zero": "concurrency = 0\n",
    "concurrency-huge": "concurrency = 9999999999999999999\n",
    "piece-size-tiny": "piece_size = 1\n",
    "piece-size-huge": 'piece_size = "2TiB"\n',
    "piece-size-list": "piece_size = [1]\n",
    "platform-int": "platform = 5\n",
    "platform-bad": 'platform = "linux"\n',
    "peer-listen-int": "peer_listen = 5\n",
    "zone-table": "[zone]\na = 1\n",
    "schedulers-ints": "schedulers = [1, 2]\n",
    "piece-timeout-nan": "piece_timeout = nan\n",
    "piece-timeout-string": 'piece_timeout = "soon"\n',
    "rate-bad": 'download_rate = "fast"\n',
    "registries-not-table": "registries = 5\n",
    "registry-unknown-key": '[registries."127.0.0.1:1"]\nverify = false\n',
    "registry-insecure-string": '[registries."127.0.0.1:1"]\ninsecure = "false"\n',
    "registry-url-int": '[registries."127.0.0.1:1"]\nurl = 5\n',
    "registry-ca-int": '[registries."127.0.0.1:1"]\nca_file = 5\n',
    "utf16": "concurrency = 1\n",  # written as UTF-16
}
_MANIFEST_JSONS = {
    "manifest-not-json": b"{not json",
    "manifest-nested": b"[" * 100_000,
    "manifest-wrong-shape": b'{"Config": 5}',
    "manifest-traversal": b'[{"Config": "../../etc/passwd", "RepoTags": [], "Layers": []}]',
}


def _make_files(root: Path) -> None:
    """The config files and archives the CLI cases name (see :func:`_cli_cases`)."""
    (root / "out").mkdir()
    for name, text in _CONFIGS.items():
        (root / f"{name}.toml").write_text(text, encoding="utf-16" if name == "utf16" else "utf-8")
    (root / "junk.bin").write_bytes(random.Random(1).randbytes(10_000))
    for name, manifest in _MANIFEST_JSONS.items():
        with tarfile.open(root / f"{name}.tar", "w") as tar:
            info = tarfile.TarInfo("manifest.json")
            info.size = len(manifest)
            tar.addfile(info, fileobj=io.BytesIO(manifest))
    layout = root / "layout-bad-index"
    layout.mkdir()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text('{"manifests": 5}')


def _cli_cases(root: Path) -> dict[str, list[str]]:
    """name -> argv (after ``python -m p2pdist``), for files made by :func:`_make_files`."""
    out = str(root / "out" / "file")
    junk = str(root / "junk.bin")
    cases: dict[str, list[str]] = {
        # get (test_get_cli covers malformed digests, uppercase names and tiny piece sizes)
        "get --concurrency 0": ["get", BLOB, "-O", out, "--concurrency", "0"],
        "get --concurrency 1000": ["get", BLOB, "-O", out, "--concurrency", "1000"],
        "get --piece-size 1": ["get", BLOB, "-O", out, "--piece-size", "1"],
        "get --piece-size 2TiB": ["get", BLOB, "-O", out, "--piece-size", "2TiB"],
        "get --piece-size 1e400": ["get", BLOB, "-O", out, "--piece-size", "1e400"],
        "get --platform x": ["get", IMAGE, "--manifest", "-O", out, "--platform", "x"],
        "get --daemon not-a-url": ["get", BLOB, "-O", out, "--daemon", "not-a-url"],
        "get --daemon ftp": ["get", BLOB, "-O", out, "--daemon", "ftp://127.0.0.1:1"],
        "get -H without colon": ["get", "http://127.0.0.1:1/x", "-O", out, "-H", "NoColon"],
        "get port out of range": ["get", "127.0.0.1:99999/a@sha256:" + "e" * 64, "-O", out],
        "get name with ..": ["get", "127.0.0.1:1/a/../b@sha256:" + "e" * 64, "-O", out],
        "get no -O": ["get", BLOB],
        # pull
        "pull --concurrency 0": ["pull", IMAGE, "--concurrency", "0"],
        "pull --piece-size 1": ["pull", IMAGE, "--piece-size", "1", "--output", out],
        "pull --platform x": ["pull", IMAGE, "--platform", "x"],
        "pull --platform a/b/c/d": ["pull", IMAGE, "--platform", "a/b/c/d"],
        "pull --daemon bad": ["pull", IMAGE, "--daemon", "bad url", "--output", out],
        "pull digest malformed": ["pull", "127.0.0.1:1/cli/image@sha256:xyz"],
        "pull digest md5": ["pull", "127.0.0.1:1/cli/image@md5:" + "e" * 32],
        "pull name ..": ["pull", "127.0.0.1:1/cli/../image:v1"],
        "pull name %2e%2e": ["pull", "127.0.0.1:1/cli/%2e%2e/image:v1"],
        "pull name //": ["pull", "127.0.0.1:1/cli//image:v1"],
        "pull name uppercase": ["pull", "127.0.0.1:1/Cli/Image:v1"],
        "pull name trailing slash": ["pull", "127.0.0.1:1/cli/image/:v1"],
        "pull name too long": ["pull", "127.0.0.1:1/" + "a" * 300 + ":v1"],
        "pull bad tag": ["pull", "127.0.0.1:1/cli/image:-v1"],
        "pull empty": ["pull", ""],
        "pull output under a file": ["pull", IMAGE, "--output", junk + "/x"],
        # import
        "import missing": ["import", str(root / "nope.tar")],
        "import junk": ["import", junk],
        "import empty dir": ["import", str(root / "out")],
        "import bad tag": ["import", junk, "--tag", "NOT A TAG"],
        "import tag with digest": ["import", junk, "--tag", BLOB],
        "import layout-bad-index": ["import", str(root / "layout-bad-index")],
        **{f"import {name}": ["import", str(root / f"{name}.tar")] for name in _MANIFEST_JSONS},
        # setup
        "setup unknown runtime": ["setup", "podman"],
        "setup containerd no registry": ["setup", "containerd"],
        # scheduler and daemon flags (refused before anything is served)
        "scheduler --listen garbage": ["scheduler", "--listen", "not-an-address"],
        "scheduler --log-level": ["scheduler", "--listen", "127.0.0.1:0", "--log-level", "loud"],
        "daemon --upload-slots 0": ["daemon", "--upload-slots", "0"],
        "daemon --peer-listen garbage": ["daemon", "--peer-listen", "x:y"],
        "daemon --scheduler ftp": ["daemon", "--scheduler", "ftp://x"],
        "daemon --upstream with a path": ["daemon", "--upstream", "http://x/v2/"],
        "unknown command": ["frobnicate"],
    }
    configs = {**{name: root / f"{name}.toml" for name in _CONFIGS}, "missing": root / "nope.toml"}
    configs["directory"] = root / "out"
    for name, path in configs.items():
        cases[f"get --config {name}"] = ["get", BLOB, "-O", out, "--config", str(path)]
    for name in ("invalid-toml", "concurrency-bool", "registry-insecure-string"):
        path = root / f"{name}.toml"
        cases[f"pull --config {name}"] = ["pull", IMAGE, "--output", out, "--config", str(path)]
        cases[f"import --config {name}"] = ["import", junk, "--config", str(path)]
        cases[f"daemon --config {name}"] = ["daemon", "--config", str(path)]
    return cases


@dataclass(frozen=True)
class CliRun:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def __str__(self) -> str:
        return f"{self.argv}: exit {self.returncode} in {self.seconds:.1f}s; stderr {self.stderr!r}"


def _run_cli(home: Path, data_dir: Path, argv: list[str]) -> CliRun:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("P2PDIST_") and not k.lower().endswith("_proxy")
    }
    env.update(HOME=str(home), DOCKER_CONFIG=str(home / ".docker"))
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    if argv[0] in ("get", "pull", "import", "daemon"):
        argv = [*argv, "--data-dir", str(data_dir)]
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "p2pdist", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return CliRun(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliRun]:
    """Every CLI case, run once, several at a time (each is a Python start-up)."""
    root = tmp_path_factory.mktemp("cli")
    _make_files(root)
    home = root / "home"
    home.mkdir()
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {
            name: pool.submit(_run_cli, home, root / "data", argv)
            for name, argv in _cli_cases(root).items()
        }
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", list(_cli_cases(Path("/cli-case-names"))))
def test_cli_bad_input_is_one_line_and_exit_2(cli_runs: dict[str, CliRun], case: str) -> None:
    run = cli_runs[case]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, str(run)
    assert len(lines) == 1, str(run)
    assert lines[0].startswith("p2pdist: error: "), str(run)
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, str(run)
    assert run.stdout == "", str(run)
    assert run.seconds < 15, str(run)  # refused up front, not after network retries


def test_cli_config_errors_name_the_key(cli_runs: dict[str, CliRun]) -> None:
    for case, needle in [
        ("get --config unknown-key", "bogus"),
        ("get --config concurrency-bool", "concurrency"),
        ("get --config platform-int", "platform"),
        ("get --config registry-insecure-string", "insecure"),
        ("get --config registry-url-int", "url"),
        ("get --config piece-timeout-nan", "piece_timeout"),
        ("get --config missing", "not found"),
    ]:
        assert needle in cli_runs[case].stderr, str(cli_runs[case])
