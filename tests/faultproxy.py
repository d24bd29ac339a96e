"""A real HTTP/1.1 reverse proxy on a loopback port that injects faults in front of a registry.

    with FaultProxy(registry.url) as proxy:
        proxy.fail_next(2, status=503)              # the next 2 requests get 503
        proxy.rate_limit_next(1, retry_after=1)     # then one 429 with Retry-After: 1
        proxy.flip_byte_in_blobs = True             # blob bodies get one byte flipped
        proxy.cut_blobs_after = 1000                # blob bodies stop after 1000 bytes
        ...  # point the client at proxy.url
        assert proxy.count("GET", "/blobs/") == 3

    # Redirects, as S3-backed registries do: blob GETs → 307 to another host:port
    with FaultProxy(registry.url) as front, FaultProxy(registry.url, addr="127.0.0.2") as cdn:
        front.redirect_blobs_to = cdn.url
        ...
        assert cdn.count("GET") == 1 and not cdn.saw_authorization()

Requests are forwarded (Host header kept, so the registry's upload ``Location`` points back at
the proxy); bodies are streamed in 64 KiB chunks in both directions, never buffered whole.
Range/206/Content-Range pass through untouched.  Every request is recorded in
``proxy.requests`` (method, path with query, headers, status answered) *before* any fault, so
faulted requests count too.  Faults are thread-safe to set at any time.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import re
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

__all__ = ["BackgroundHTTPServer", "FaultProxy", "RequestRecord", "check_loopback"]

CHUNK = 64 << 10
BLOB_PATH = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+:[0-9a-fA-F]+)$")
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)


def check_loopback(addr: str) -> None:
    if not ipaddress.ip_address(addr).is_loopback:
        raise ValueError(f"only loopback addresses are allowed, got {addr!r}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(addr, handler)
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-body is routine for a fault proxy; anything else is shown.
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self.sockets_lock:
            socks = list(self.open_sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


class BackgroundHTTPServer:
    """A ``ThreadingHTTPServer`` on a loopback port, served from a daemon thread.

    Subclasses set ``handler_class`` (whose ``self.server.owner`` is this object).  Stopping
    also shuts down idle keep-alive connections so that no handler thread outlives it.
    """

    handler_class: type[BaseHTTPRequestHandler]

    def __init__(self, *, addr: str = "127.0.0.1", port: int = 0) -> None:
        check_loopback(addr)
        self.addr = addr
        self._want_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        port: int = self._server.server_address[1]
        return port

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> None:
        server = _Server((self.addr, self._want_port), self.handler_class)
        server.owner = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_all_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass(slots=True)
class RequestRecord:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # lower-cased names
    status: int = 0  # the status the proxy answered (0 while in flight)
    fault: str | None = None  # "fail", "rate_limit", "redirect", "flip", "cut" or None

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass(slots=True)
class _Faults:
    fail_left: int = 0
    fail_status: int = 503
    fail_match: str | None = None
    rate_left: int = 0
    retry_after: int = 1
    rate_match: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120  # idle keep-alive connections close after this
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def proxy(self) -> FaultProxy:
        owner: FaultProxy = self.server.owner  # type: ignore[attr-defined]
        return owner

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    # -- request body ------------------------------------------------------------------------

    def _request_body(self) -> Iterator[bytes] | bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length <= CHUNK:
            return self.rfile.read(length) if length else None
        return self._read_length(length)

    def _read_length(self, length: int) -> Iterator[bytes]:
        left = length
        while left > 0:
            data = self.rfile.read(min(CHUNK, left))
            if not data:
                raise ConnectionError("client closed mid-body")
            left -= len(data)
            yield data

    def _read_chunked(self) -> Iterator[bytes]:
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            yield from self._read_length(size)
            self.rfile.readline()

    def _drain_body(self) -> None:
        body = self._request_body()
        if body is not None and not isinstance(body, bytes):
            for _ in body:
                pass

    # -- responses ---------------------------------------------------------------------------

    def _send_simple(
        self, rec: RequestRecord, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        rec.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        proxy = self.proxy
        rec = RequestRecord(
            self.command, self.path, {k.lower(): v for k, v in self.headers.items()}
        )
        fault = proxy._take_fault(rec)
        path_only = urllib.parse.urlsplit(self.path).path
        is_blob = BLOB_PATH.match(path_only) is not None
        if fault is not None:
            self._drain_body()
            rec.fault, status, headers = fault
            err = "TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"
            body = json.dumps(
                {"errors": [{"code": err, "message": "injected fault", "detail": None}]}
            ).encode()
            self._send_simple(rec, status, body, {"Content-Type": "application/json", **headers})
            return
        redirect = proxy.redirect_blobs_to
        if redirect and is_blob and self.command == "GET":
            rec.fault = "redirect"
            location = redirect.rstrip("/") + self.path
            self._send_simple(rec, 307, b"", {"Location": location})
            return
        try:
            self._forward(rec, is_blob)
        except (OSError, http.client.HTTPException) as exc:
            if rec.status == 0:  # nothing sent yet: answer like a real gateway would
                self.close_connection = True
                msg = f"upstream {proxy.upstream_url}: {exc}".encode()
                self._send_simple(rec, 502, msg, {"Content-Type": "text/plain"})
            else:
                raise

    def _forward(self, rec: RequestRecord, is_blob: bool) -> None:
        proxy = self.proxy
        up = urllib.parse.urlsplit(proxy.upstream_url)
        conn = http.client.HTTPConnection(up.hostname or "", up.port or 80, timeout=120)
        try:
            body = self._request_body()
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    conn.putheader(k, v)
            chunked_up = False
            if isinstance(body, bytes):
                conn.putheader("Content-Length", str(len(body)))
            elif body is not None:
                if "Content-Length" in self.headers:
                    conn.putheader("Content-Length", self.headers["Content-Length"])
                else:
                    conn.putheader("Transfer-Encoding", "chunked")
                    chunked_up = True
            elif self.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", "0")
            conn.endheaders()
            if isinstance(body, bytes):
                conn.send(body)
            elif body is not None:
                for part in body:
                    conn.send(b"%x\r\n%s\r\n" % (len(part), part) if chunked_up else part)
                if chunked_up:
                    conn.send(b"0\r\n\r\n")
            resp = conn.getresponse()
            self._relay(rec, resp, is_blob)
        finally:
            conn.close()

    def _relay(self, rec: RequestRecord, resp: http.client.HTTPResponse, is_blob: bool) -> None:
        proxy = self.proxy
        rec.status = resp.status
        self.send_response(resp.status, resp.reason)
        length_hdr = resp.getheader("Content-Length")
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        has_body = self.command != "HEAD" and resp.status not in (204, 304)
        chunked_down = has_body and length_hdr is None
        if chunked_down:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if not has_body:
            return
        tamper = is_blob and resp.status in (200, 206)
        flip = tamper and proxy.flip_byte_in_blobs
        cut = proxy.cut_blobs_after if tamper else None
        total = int(length_hdr) if length_hdr is not None else -1
        flip_at = total // 2 if total > 0 else 0
        sent = 0
        while True:
            data = resp.read1(CHUNK) if total < 0 else resp.read(min(CHUNK, total - sent))
            if not data:
                break
            if flip and sent <= flip_at < sent + len(data):
                buf = bytearray(data)
                buf[flip_at - sent] ^= 0xFF
                data = bytes(buf)
                rec.fault = "flip"
            if cut is not None and sent + len(data) > cut:
                data = data[: max(0, cut - sent)]
                if data:
                    self.wfile.write(data)
                rec.fault = "cut"
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked_down else data)
            sent += len(data)
            if total >= 0 and sent >= total:
                break
        if chunked_down:
            self.wfile.write(b"0\r\n\r\n")


class FaultProxy(BackgroundHTTPServer):
    """A fault-injecting reverse proxy to ``upstream_url`` (a loopback http URL).

    Faults (settable any time, from any thread):
      * :meth:`fail_next` — answer the next ``n`` requests with ``status`` (503 by default);
      * :meth:`rate_limit_next` — answer the next ``n`` with 429 + ``Retry-After``;
      * ``flip_byte_in_blobs`` — flip the middle byte of each blob body (length kept), on
        200 and 206 answers to ``GET /v2/<repo>/blobs/<digest>``;
      * ``cut_blobs_after`` — send at most that many bytes of each blob body, then close the
        connection (the Content-Length promised more);
      * ``redirect_blobs_to`` — answer blob GETs with 307 to ``<that url><path>``.
    ``fail_next``/``rate_limit_next`` take ``match=`` (a substring of ``METHOD path``, e.g.
    ``"GET /v2/test/app/blobs/"``) to hit only some requests.
    """

    handler_class = _ProxyHandler

    def __init__(self, upstream_url: str, *, addr: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(addr=addr, port=port)
        up = urllib.parse.urlsplit(upstream_url)
        if up.scheme != "http" or not up.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_url!r}")
        check_loopback(up.hostname)
        self.upstream_url = upstream_url.rstrip("/")
        self.flip_byte_in_blobs = False
        self.cut_blobs_after: int | None = None
        self.redirect_blobs_to: str | None = None
        self.requests: list[RequestRecord] = []
        self._faults = _Faults()
        self._lock = threading.Lock()

    def fail_next(self, n: int, status: int = 503, *, match: str | None = None) -> None:
        with self._lock:
            self._faults.fail_left, self._faults.fail_status = n, status
            self._faults.fail_match = match

    def rate_limit_next(self, n: int, retry_after: int = 1, *, match: str | None = None) -> None:
        with self._lock:
            self._faults.rate_left, self._faults.retry_after = n, retry_after
            self._faults.rate_match = match

    def reset(self) -> None:
        """Clear all faults and the request log."""
        with self._lock:
            self._faults = _Faults()
            self.requests = []
        self.flip_byte_in_blobs = False
        self.cut_blobs_after = None
        self.redirect_blobs_to = None

    def _take_fault(self, rec: RequestRecord) -> tuple[str, int, dict[str, str]] | None:
        key = f"{rec.method} {rec.path}"
        with self._lock:
            self.requests.append(rec)
            f = self._faults
            if f.fail_left > 0 and (f.fail_match is None or f.fail_match in key):
                f.fail_left -= 1
                return "fail", f.fail_status, {}
            if f.rate_left > 0 and (f.rate_match is None or f.rate_match in key):
                f.rate_left -= 1
                return "rate_limit", 429, {"Retry-After": str(f.retry_after)}
        return None

    # -- what happened -----------------------------------------------------------------------

    def records(self, method: str | None = None, path: str | None = None) -> list[RequestRecord]:
        """Requests seen, filtered by method and by a substring of the path."""
        with self._lock:
            recs = list(self.requests)
        return [
            r
            for r in recs
            if (method is None or r.method == method) and (path is None or path in r.path)
        ]

    def count(self, method: str | None = None, path: str | None = None) -> int:
        return len(self.records(method, path))

    def counts(self) -> dict[tuple[str, str], int]:
        """(method, path) → number of requests."""
        out: dict[tuple[str, str], int] = {}
        for r in self.records():
            out[(r.method, r.path)] = out.get((r.method, r.path), 0) + 1
        return out

    def saw_authorization(self, path: str | None = None) -> bool:
        """Whether any request (to a path containing ``path``) carried Authorization."""
        return any(r.authorization is not None for r in self.records(path=path))

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "stopped"
        return f"<FaultProxy {where} → {self.upstream_url}>"
