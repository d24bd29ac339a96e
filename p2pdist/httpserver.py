"""A small, fast HTTP/1.1 server on trio + h11, shared by every p2pdist server.

Design
======

* **Style.** :func:`serve_http` is a trio ``serve_*`` function: it binds, reports a
  :class:`ServerInfo` through ``task_status.started()`` and never returns; cancel the task
  that runs it to stop it (the listeners and every connection are closed).  Each
  connection is one task in the server's nursery; everything a connection can raise
  (client garbage, resets, timeouts, bugs) ends *that* connection only.  ``trio.Cancelled``
  (a ``BaseException``) is never caught.

* **Protocol.** h11 does the HTTP/1.1 bookkeeping: keep-alive, pipelining, chunked
  request and response bodies, ``Expect: 100-continue``, HEAD framing.  The socket is read
  64 KiB at a time (what h11 parses best).  Small responses (head + body) go out in one
  ``send``.  Garbage is answered before the connection is closed: 400 (malformed), 431
  (a request line + headers over ``max_header_bytes``), 505 (not HTTP/1.0 or 1.1), 501
  (an unknown transfer coding); a request with both ``Content-Length`` and
  ``Transfer-Encoding`` is read by the latter and its connection closed after the answer
  (RFC 9112 §6.1, request smuggling).

* **Handlers.** A handler is ``async def handler(request: Request) -> Response``.  It may
  raise :class:`HTTPError` (sent as that status with a JSON error body in the registry
  style ``{"errors": [{"code": ..., "message": ...}]}``); any other exception becomes a 500
  with ``{"errors":[{"code":"UNKNOWN","message":"internal error"}]}`` and a traceback on
  the ``p2pdist.http`` logger.  Client garbage (malformed requests, oversized headers,
  resets, slow clients) is logged at DEBUG only.

* **Bodies.**  ``bytes`` get a ``Content-Length``.  An ``AsyncIterable[bytes]`` is sent as
  it comes: chunked, unless the handler set ``Content-Length`` (then exactly that many
  bytes must come, or the connection is closed so the client sees a truncated body).  The
  first chunk is pulled *before* the status line is sent, so a generator that fails at
  once still turns into a proper error status.  :class:`FileBody` is sent with
  ``os.sendfile`` straight from the page cache to the socket (zero-copy; on ``EAGAIN`` the
  task waits with ``trio.lowlevel.wait_writable``), falling back to 1 MiB ``pread`` +
  ``send`` when sendfile cannot be used (non-socket streams, odd files).  Like nginx
  without ``aio threads``, ``open``/``sendfile``/``pread`` run on the event loop: they are
  fast on local disks with a warm page cache, which is what a piece store serves from.

* **HEAD** responses carry the headers of the GET (including its ``Content-Length``) and
  no body: the server drops what the handler returned, never iterates a stream and never
  reads a :class:`FileBody`'s file.  A handler that answers HEAD without a body may set
  ``Content-Length`` itself; it is kept.

* **Timeouts** are keyword-only fields of :class:`ServerConfig`: ``header_timeout`` (from
  a new connection or the first byte of a request to the end of its headers — the
  slowloris guard), ``keepalive_timeout`` (idle between requests), ``read_timeout`` (no
  byte of a request body for that long → 408) and ``send_timeout`` (one write of at most
  1 MiB, or one wait for socket space, taking longer → the connection is dropped).  A
  handler's own run time is its business (``trio.fail_after`` inside the handler).

* **Unread request bodies.**  If a handler does not read the request body, up to 1 MiB is
  drained after the response so that the connection can be reused; a longer body closes
  the connection (after a short lingering half-close so that the client gets to read the
  response).

* **Observability.** ``ServerConfig.on_response(request, status, body_bytes_sent,
  seconds)`` is called once per request that reached the handler stage (also for error
  statuses and for responses cut short by the client).  Nothing here logs headers;
  :class:`Headers` hides ``Authorization``/``Cookie`` values in its ``repr``.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import http
import json as _json
import logging
import os
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, Protocol, cast
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import trio

from .errors import P2PDistError
from .ratelimit import RateLimiter

__all__ = [
    "FileBody",
    "FileChunk",
    "HTTPError",
    "Handler",
    "Headers",
    "RangeNotSatisfiable",
    "Request",
    "Response",
    "ServerConfig",
    "ServerInfo",
    "content_range",
    "parse_range",
    "raise_open_file_limit",
    "serve_http",
    "serve_http_listeners",
]

logger = logging.getLogger("p2pdist.http")

_RECV_SIZE: Final = 64 * 1024  # h11 parses best when fed 64 KiB at a time
_SEND_SLICE: Final = 1 << 20  # send_timeout applies per slice of this size
_COALESCE_LIMIT: Final = 64 * 1024  # join head + body into one send below this
_FALLBACK_CHUNK: Final = 1 << 20  # pread chunk when sendfile is unavailable
_SENDFILE_MAX: Final = 0x7FFFF000  # Linux caps one sendfile call at this
_LIMITED_SENDFILE: Final = 128 << 10  # sendfile slice under a send_limiter
_DRAIN_LIMIT: Final = 1 << 20  # unread request body drained to keep the connection
_LINGER_SECONDS: Final = 1.0
_LINGER_BYTES: Final = 1 << 20
_ACCEPT_RETRY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_SENDFILE_UNSUPPORTED: Final = frozenset(
    {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ESPIPE}
)
_SECRET_HEADERS: Final = frozenset({"authorization", "proxy-authorization", "cookie"})


# --------------------------------------------------------------------------- headers


class Headers:
    """Case-insensitive, ordered multi-map of request header fields.

    Names are lower-cased; iteration yields ``(name, value)`` pairs in arrival order.
    ``get`` joins repeated fields with ``", "`` (their HTTP meaning, as httpx does);
    ``get_all`` returns them one by one.
    """

    __slots__ = ("_items", "_map")

    def __init__(self, items: Iterable[tuple[str | bytes, str | bytes]] = ()) -> None:
        pairs: list[tuple[str, str]] = []
        index: dict[str, list[str]] = {}
        for name, value in items:
            n = (name.decode("latin-1") if isinstance(name, bytes) else name).lower()
            v = value.decode("latin-1") if isinstance(value, bytes) else value
            pairs.append((n, v))
            index.setdefault(n, []).append(v)
        self._items: tuple[tuple[str, str], ...] = tuple(pairs)
        self._map = index

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._map.get(name.lower())
        if not values:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def get_all(self, name: str) -> list[str]:
        return list(self._map.get(name.lower(), ()))

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        shown = [(n, "[hidden]" if n in _SECRET_HEADERS else v) for n, v in self._items]
        return f"Headers({shown!r})"


# --------------------------------------------------------------------------- errors


_DEFAULT_CODES: Final = {
    401: "UNAUTHORIZED",
    403: "DENIED",
    429: "TOOMANYREQUESTS",
    500: "UNKNOWN",
}


def _status_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "error"


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


def _default_code(status: int) -> str:
    if status in _DEFAULT_CODES:
        return _DEFAULT_CODES[status]
    try:
        return http.HTTPStatus(status).name
    except ValueError:
        return "UNKNOWN"


def _error_body(code: str, message: str) -> bytes:
    return _json.dumps(
        {"errors": [{"code": code, "message": message}]}, separators=(",", ":")
    ).encode()


class HTTPError(Exception):
    """Raise from a handler to answer with ``status``.

    Without ``body`` the body is the registry-style JSON error
    ``{"errors":[{"code": code, "message": message}]}``; ``code`` defaults to a name for
    the status (``NOT_FOUND``, ``DENIED``, ``UNAUTHORIZED``, ...).  ``headers`` are added
    to the response (e.g. ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str = "",
        *,
        body: bytes | None = None,
        headers: Sequence[tuple[str, str]] = (),
        content_type: str = "application/json",
        code: str | None = None,
    ) -> None:
        self.status = status
        self.message = message or _status_phrase(status)
        self.code = code or _default_code(status)
        self.body = body
        self.headers = list(headers)
        self.content_type = content_type
        super().__init__(f"{status} {self.message}")

    def to_response(self) -> Response:
        body = self.body if self.body is not None else _error_body(self.code, self.message)
        headers = [("Content-Type", self.content_type), *self.headers]
        return Response(self.status, headers, body)


class RangeNotSatisfiable(HTTPError):
    """416 from :func:`parse_range`; carries ``Content-Range: bytes */size``."""

    def __init__(self, size: int) -> None:
        super().__init__(
            416,
            "requested range not satisfiable",
            headers=[("Content-Range", f"bytes */{size}")],
            code="RANGE_NOT_SATISFIABLE",
        )
        self.size = size


# --------------------------------------------------------------------------- ranges


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Interpret a ``Range`` header (RFC 9110 §14) against a representation of ``size``.

    Returns ``(start, end_exclusive)`` for one satisfiable byte range (clipped to
    ``size``), or ``None`` when the header should be ignored and the whole representation
    served with 200: no header, another unit, a syntactically invalid header (garbage,
    ``bytes=10-5``), or several ranges (multipart/byteranges is not supported).  Raises
    :class:`RangeNotSatisfiable` (an :class:`HTTPError` 416 with ``Content-Range: bytes
    */size``) when the single range starts at or beyond ``size`` or is ``bytes=-0``; let
    it propagate out of a handler to answer 416.
    """
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    spec = spec.strip()
    if "," in spec:
        return None
    first, dash, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not _is_digits(first, empty_ok=True) or not _is_digits(last, empty_ok=True):
        return None
    if not first:
        if not last:
            return None  # "bytes=-"
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable(size)
        if size == 0:
            return None  # a non-empty suffix of nothing: serve the (empty) whole
        return (max(0, size - suffix), size)
    start = int(first)
    if last:
        end = int(last)
        if end < start:
            return None  # invalid range-spec: ignore the header
        if start >= size:
            raise RangeNotSatisfiable(size)
        return (start, min(end + 1, size))
    if start >= size:
        raise RangeNotSatisfiable(size)
    return (start, size)


def _is_digits(text: str, *, empty_ok: bool) -> bool:
    if not text:
        return empty_ok
    return text.isascii() and text.isdigit()


def content_range(start: int, end: int, size: int) -> str:
    """The ``Content-Range`` value for the 206 of ``parse_range``'s ``(start, end)``."""
    return f"bytes {start}-{end - 1}/{size}"


# --------------------------------------------------------------------------- bodies


@dataclass(frozen=True, slots=True)
class FileBody:
    """A byte range of a file, sent with ``os.sendfile``.

    Give either ``path`` (the server opens and closes the file) or ``fd=`` (**the server
    takes ownership and closes it** when the response is done or abandoned — pass
    ``os.dup(fd)`` if you keep using your own).  ``length=None`` means "to the end of the
    file" (the server ``fstat``s/``stat``s it).  The range must lie inside the file when
    the response starts, or the request fails with 500 before anything is sent; if the
    file shrinks while it is being sent, the connection is closed (truncated body).
    """

    path: str | os.PathLike[str] | None = None
    offset: int = 0
    length: int | None = None
    fd: int | None = field(default=None, kw_only=True)
    on_done: Callable[[], None] | None = field(default=None, kw_only=True, compare=False)
    """Called exactly once when the server is finished with the body (sent, abandoned, or
    never needed, as for HEAD): e.g. to release an upload slot only after the bytes went."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.fd is None):
            raise ValueError("FileBody needs exactly one of path and fd")
        if self.offset < 0 or (self.length is not None and self.length < 0):
            raise ValueError("FileBody offset and length must not be negative")


@dataclass(slots=True)
class FileChunk:
    """An item of a streamed body sent with ``sendfile``: ``length`` bytes of the open file
    ``fd`` from ``offset``.  **The server closes** ``fd`` once the chunk is sent (or the
    response abandoned).  For bodies that mix bytes with stretches of a file that is still
    being written (a blob streamed as its pieces are verified)."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


Body = bytes | AsyncIterable[bytes] | AsyncIterable[bytes | FileChunk] | FileBody


def file_response(
    path: str | os.PathLike[str], range_header: str | None, headers: Iterable[tuple[str, str]]
) -> Response:
    """A whole file (200) or the byte range a ``Range`` header asks for (206), zero-copy.

    The file is opened here, so a later rename or unlink of ``path`` cannot change what is
    sent.  ``FileNotFoundError`` propagates (the caller decides what "gone" means);
    an unsatisfiable range raises :class:`RangeNotSatisfiable`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        rng = parse_range(range_header, size)
    except BaseException:
        os.close(fd)
        raise
    out = list(headers)
    if rng is None:
        return Response(200, out, FileBody(fd=fd, offset=0, length=size))
    start, end = rng
    out.append(("Content-Range", content_range(start, end, size)))
    return Response(206, out, FileBody(fd=fd, offset=start, length=end - start))


@dataclass(slots=True)
class Response:
    """What a handler returns.  ``Content-Length`` is added for ``bytes`` and
    :class:`FileBody` bodies; ``Date`` and ``Server`` are added when missing."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: Body = b""

    @classmethod
    def json(cls, obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()) -> Response:
        body = _json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, [("Content-Type", "application/json"), *headers], body)

    @classmethod
    def text(
        cls, text: str, status: int = 200, headers: Iterable[tuple[str, str]] = ()
    ) -> Response:
        return cls(status, [("Content-Type", "text/plain; charset=utf-8"), *headers], text.encode())

    @classmethod
    def empty(cls, status: int = 204, headers: Iterable[tuple[str, str]] = ()) -> Response:
        return cls(status, list(headers), b"")


def _internal_error_response() -> Response:
    return Response.json({"errors": [{"code": "UNKNOWN", "message": "internal error"}]}, 500)


# --------------------------------------------------------------------------- request


class _BodySource(Protocol):
    async def read(self, limit: int) -> bytes: ...


class _FixedBody:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, limit: int) -> bytes:
        await trio.lowlevel.checkpoint()
        if len(self._data) > limit:
            raise HTTPError(413, f"request body larger than {limit} bytes")
        return self._data


@dataclass(frozen=True, slots=True, eq=False)
class Request:
    """One request as a handler sees it (headers parsed; body not yet read)."""

    method: str
    target: str
    path: str
    query: Mapping[str, list[str]]
    headers: Headers
    client: tuple[str, int]
    _body: _BodySource = field(repr=False)

    async def read_body(self, limit: int = 1 << 20) -> bytes:
        """The whole request body (``Content-Length`` or chunked).

        Raises ``HTTPError(413)`` when it is longer than ``limit`` (checked against the
        declared ``Content-Length`` before reading), ``HTTPError(400)`` for a malformed
        body or a client that went away, ``HTTPError(408)`` when the client stalls for
        ``read_timeout``.  Calling it again returns the same bytes.  Call it from the
        handler (not from a task that outlives it): after the handler returns, an unread
        body is drained or the connection closed.
        """
        return await self._body.read(limit)

    @classmethod
    def make(
        cls,
        method: str,
        target: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        client: tuple[str, int] = ("127.0.0.1", 0),
    ) -> Request:
        """A request without a connection, for unit-testing handlers."""
        path, query = _split_target(target)
        return cls(method, target, path, query, Headers(headers), client, _FixedBody(body))


def _split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """(percent-decoded path, query) of an origin-form or absolute-form target."""
    if target == "*":
        return "*", {}
    lowered = target[:8].lower()
    if lowered.startswith(("http://", "https://")):
        parts = urlsplit(target)
        raw_path, raw_query = parts.path or "/", parts.query
    else:
        raw_path, _, raw_query = target.partition("?")
        raw_path = raw_path.partition("#")[0]
        raw_query = raw_query.partition("#")[0]
    query = parse_qs(raw_query, keep_blank_values=True) if raw_query else {}
    return unquote(raw_path), query


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Where :func:`serve_http` listens (the real port when 0 was asked for)."""

    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


OnResponse = Callable[[Request, int, int, float], None]
Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """Limits and hooks of :func:`serve_http` (all times in seconds)."""

    max_header_bytes: int = 64 * 1024
    keepalive_timeout: float = 75.0
    header_timeout: float = 30.0
    read_timeout: float = 60.0
    send_timeout: float = 60.0
    max_connections: int = 1024
    server_name: str = "p2pdist"
    #: ``on_response(request, status, body_bytes_sent, seconds)`` after each response.
    on_response: OnResponse | None = None
    #: Paces every byte sent on every connection of the server (an upload limit).
    send_limiter: RateLimiter | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_header_bytes",
            "keepalive_timeout",
            "header_timeout",
            "read_timeout",
            "send_timeout",
            "max_connections",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServerConfig.{name} must be positive")


# --------------------------------------------------------------------------- serving


def raise_open_file_limit(want: int = 1 << 16) -> int:
    """Lift this process's soft ``RLIMIT_NOFILE`` towards ``want`` (at most the hard
    limit), as Go programs do at start; returns the soft limit now in force.

    Every connection is a descriptor: a server with the default ``max_connections``
    (1024) alone needs more than the soft limit of 1024 that systemd and most shells give,
    and when descriptors run out everything else the process does (files, outgoing
    connections) fails with ``EMFILE`` too.  Call it once from a long-running server's
    entry point (not from a library or a test)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open file limit from %d: %s", soft, exc)
            return soft
        return target
    return soft


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    config: ServerConfig | None = None,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handler`` over HTTP/1.1 on ``host:port`` (0 = an ephemeral port) forever.

    Use ``info = await nursery.start(serve_http, handler, "127.0.0.1", 0)``; cancel the
    task to stop (listener and connections are closed).  Give a numeric ``host``: a name
    such as ``localhost`` may bind several listeners, and with port 0 each gets its own
    port (``ServerInfo`` reports the first).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    await serve_http_listeners(handler, listeners, config=config, task_status=task_status)


async def serve_http_listeners(
    handler: Handler,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    *,
    config: ServerConfig | None = None,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Like :func:`serve_http` on listeners you made (e.g. a unix socket for a local API).

    The listeners are closed when this returns (by cancellation).
    """
    server = _Server(handler, config or ServerConfig())
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(server.accept_loop, listener, nursery)
            task_status.started(_server_info(listeners))
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()
    raise AssertionError("unreachable: the accept loops never return")  # pragma: no cover


def _server_info(listeners: Sequence[trio.abc.Listener[trio.abc.Stream]]) -> ServerInfo:
    for listener in listeners:
        if isinstance(listener, trio.SocketListener):
            name = listener.socket.getsockname()
            if isinstance(name, tuple):
                return ServerInfo(str(name[0]), int(name[1]))
            return ServerInfo(name.decode() if isinstance(name, bytes) else str(name), 0)
    return ServerInfo("", 0)


class _Server:
    def __init__(self, handler: Handler, config: ServerConfig) -> None:
        self.handler = handler
        self.config = config
        self.slots = trio.Semaphore(config.max_connections)

    async def accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        while True:
            await self.slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                self.slots.release()
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    logger.warning("accept failed (%s); retrying in 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                raise
            except BaseException:
                self.slots.release()
                raise
            nursery.start_soon(self.run_connection, stream)

    async def run_connection(self, stream: trio.abc.Stream) -> None:
        client = _peer_address(stream)
        try:
            async with stream:
                await _Connection(self, stream, client).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            logger.debug("connection from %s ended: %r", client, exc)
        except Exception:
            logger.exception("unexpected error on the connection from %s", client)
        finally:
            self.slots.release()


def _peer_address(stream: trio.abc.Stream) -> tuple[str, int]:
    if isinstance(stream, trio.SocketStream):
        try:
            name = stream.socket.getpeername()
        except OSError:
            return ("", 0)
        if isinstance(name, tuple):
            return (str(name[0]), int(name[1]))
        return (name.decode() if isinstance(name, bytes) else str(name), 0)
    return ("", 0)


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = email.utils.formatdate(now, usegmt=True)
    return str(_date_cache[1])


class _WireBody:
    """The request body as it arrives on the connection (see :meth:`Request.read_body`)."""

    def __init__(self, conn: _Connection, declared: int | None) -> None:
        self._conn = conn
        self._declared = declared
        self._data: bytes | None = None
        self._failed: HTTPError | None = None

    async def read(self, limit: int) -> bytes:
        if self._data is not None:
            await trio.lowlevel.checkpoint()
            if len(self._data) > limit:
                raise HTTPError(413, f"request body larger than {limit} bytes")
            return self._data
        if self._failed is not None:
            await trio.lowlevel.checkpoint()
            raise self._failed
        if self._declared is not None and self._declared > limit:
            await trio.lowlevel.checkpoint()
            self._failed = HTTPError(413, f"request body larger than {limit} bytes")
            raise self._failed
        conn = self._conn
        chunks: list[bytes] = []
        size = 0
        try:
            if conn.h11.they_are_waiting_for_100_continue:
                await conn.send_bytes(
                    conn.h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                )
            while True:
                event = await conn.next_body_event()
                if isinstance(event, h11.EndOfMessage):
                    break
                size += len(event.data)
                if size > limit:
                    self._failed = HTTPError(413, f"request body larger than {limit} bytes")
                    raise self._failed
                chunks.append(bytes(event.data))
        except h11.RemoteProtocolError as exc:
            conn.must_close = True
            logger.debug("malformed request body from %s: %s", conn.client, exc)
            self._failed = HTTPError(400, "malformed request body")
            raise self._failed from None
        except trio.TooSlowError:
            conn.must_close = True
            self._failed = HTTPError(408, "request body timed out")
            raise self._failed from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            conn.must_close = True
            self._failed = HTTPError(400, "client closed the connection")
            raise self._failed from None
        self._data = b"".join(chunks)
        return self._data


class _Aborted(Exception):
    """The response cannot be completed; close the connection (already logged)."""


@dataclass(slots=True)
class _Prepared:
    """A response ready to go: the h11 head and exactly one body source."""

    event: h11.Response
    status: int
    data: bytes = b""
    fd: int | None = None
    close_fd: bool = False
    offset: int = 0
    length: int = 0
    stream: AsyncIterator[bytes | FileChunk] | None = None
    first: bytes | FileChunk | None = None
    on_done: Callable[[], None] | None = None

    async def release(self) -> None:
        if isinstance(self.first, FileChunk):
            self.first.close()
        if self.on_done is not None:
            done, self.on_done = self.on_done, None
            done()
        if self.fd is not None and self.close_fd:
            fd, self.fd = self.fd, None
            os.close(fd)
        if self.stream is not None:
            stream, self.stream = self.stream, None
            await _aclose(stream)


_NO_EVENT: Final = h11.Response(status_code=200, headers=[])


async def _aclose(it: object) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


def _http_error_in(exc: BaseException) -> HTTPError | None:
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _http_error_in(exc.exceptions[0])
    return None


class _Connection:
    def __init__(self, server: _Server, stream: trio.abc.Stream, client: tuple[str, int]) -> None:
        self.server = server
        self.config = server.config
        self.stream = stream
        self.client = client
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.config.max_header_bytes
        )
        self.must_close = False
        self.body_sent = 0  # body bytes of the current response that went out

    # ---- receiving

    async def run(self) -> None:
        first = True
        while True:
            try:
                event = await self.read_request_head(first)
            except h11.RemoteProtocolError as exc:
                logger.debug("bad request from %s: %s", self.client, exc)
                await self.send_protocol_error(exc.error_status_hint, str(exc))
                return
            if event is None:
                return
            first = False
            if not await self.handle(event):
                await self.linger_close()
                return
            if not await self.finish_cycle():
                await self.linger_close()
                return

    async def read_request_head(self, first: bool) -> h11.Request | None:
        cfg = self.config
        idle = cfg.header_timeout if first else cfg.keepalive_timeout
        started = False
        # h11 bounds only an *incomplete* head; one that arrives whole in a 64 KiB read
        # is not checked, so count what the head took here.
        pending = len(self.h11.trailing_data[0])
        fed = 0
        with trio.CancelScope(deadline=trio.current_time() + idle) as scope:
            while True:
                event = self.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await self.stream.receive_some(_RECV_SIZE)
                    if data and not started:
                        started = True
                        deadline = trio.current_time() + cfg.header_timeout
                        scope.deadline = min(scope.deadline, deadline)
                    fed += len(data)
                    self.h11.receive_data(bytes(data))
                    continue
                if isinstance(event, h11.Request):
                    if pending + fed > cfg.max_header_bytes:
                        head = pending + fed - len(self.h11.trailing_data[0])
                        if head > cfg.max_header_bytes:
                            raise h11.RemoteProtocolError("request header fields too large", 431)
                    if event.http_version not in (b"1.0", b"1.1"):
                        raise h11.RemoteProtocolError("only HTTP/1.0 and HTTP/1.1 are served", 505)
                    return event
                if isinstance(event, h11.ConnectionClosed):
                    return None
                raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} event", 400)
        logger.debug(
            "closing %s connection from %s: %s",
            "slow" if started else "idle",
            self.client,
            "headers not complete in time" if started else "idle timeout",
        )
        return None

    async def next_body_event(self) -> h11.Data | h11.EndOfMessage:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                with trio.fail_after(self.config.read_timeout):
                    data = await self.stream.receive_some(_RECV_SIZE)
                self.h11.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Data | h11.EndOfMessage):
                return event
            raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} event", 400)

    async def finish_cycle(self) -> bool:
        """After a response: drain an unread body, then get ready for the next request."""
        if self.must_close or self.h11.our_state is not h11.DONE:
            return False
        drained = 0
        try:
            while self.h11.their_state is h11.SEND_BODY:
                event = await self.next_body_event()
                if isinstance(event, h11.Data):
                    drained += len(event.data)
                    if drained > _DRAIN_LIMIT:
                        return False
        except (h11.RemoteProtocolError, trio.TooSlowError) as exc:
            logger.debug("not draining the request body from %s: %r", self.client, exc)
            return False
        if self.h11.their_state is not h11.DONE:
            return False
        self.h11.start_next_cycle()
        return True

    # ---- handling

    async def handle(self, event: h11.Request) -> bool:
        """Run the handler for one request and send its response; False → close."""
        start = trio.current_time()
        target = event.target.decode("latin-1")
        path, query = _split_target(target)
        headers = Headers(event.headers)
        declared: int | None = None
        length_header = headers.get("content-length")
        if length_header is not None and "transfer-encoding" not in headers:
            with contextlib.suppress(ValueError):
                declared = int(length_header)  # h11 validated it; be safe anyway
        elif length_header is not None:
            # Both framings (h11 reads the chunked one): a smuggling attempt, or a broken
            # intermediary.  RFC 9112 §6.1: close the connection after responding.
            self.must_close = True
        request = Request(
            event.method.decode("latin-1"),
            target,
            path,
            query,
            headers,
            self.client,
            _WireBody(self, declared),
        )
        status = 0
        self.body_sent = 0
        try:
            response = await self.call_handler(request)
            if (
                declared is not None
                and declared > _DRAIN_LIMIT
                and self.h11.their_state is h11.SEND_BODY
            ):
                # A body too long to drain (a 413, or one the handler ignored): say we
                # close, rather than wait read_timeout for bytes we would not read anyway.
                self.must_close = True
            prepared = await self.prepare_or_error(request, response)
            status = prepared.status
            try:
                await self.send_prepared(request, prepared)
            finally:
                await prepared.release()
            return True
        except _Aborted:
            return False
        finally:
            hook = self.config.on_response
            if hook is not None and status:
                try:
                    hook(request, status, self.body_sent, trio.current_time() - start)
                except Exception:
                    logger.exception("on_response hook failed")

    async def call_handler(self, request: Request) -> Response:
        try:
            response = await self.server.handler(request)
        except Exception as exc:
            error = _http_error_in(exc)
            if error is not None:
                return error.to_response()
            logger.exception("handler failed: %s %s", request.method, request.path)
            return _internal_error_response()
        if not isinstance(response, Response):
            logger.error(
                "handler returned %r, not a Response: %s %s",
                type(response).__name__,
                request.method,
                request.path,
            )
            return _internal_error_response()
        return response

    async def prepare_or_error(self, request: Request, response: Response) -> _Prepared:
        try:
            return await self.prepare(request, response)
        except Exception as exc:
            error = _http_error_in(exc)
            if error is None:
                logger.exception("cannot send the response to %s %s", request.method, request.path)
        if error is not None:
            try:
                return await self.prepare(request, error.to_response())
            except Exception:
                logger.exception("cannot send an HTTPError response: %r", error)
        return await self.prepare(request, _internal_error_response())

    async def prepare(self, request: Request, response: Response) -> _Prepared:
        """Build the head and open the body.

        The body's resources (a FileBody's fd, a stream's iterator) move into the
        returned :class:`_Prepared` first thing, so that every failure releases them
        exactly once (``_Prepared.release`` is idempotent).
        """
        prepared = _Prepared(_NO_EVENT, response.status)
        body = response.body
        if isinstance(body, FileBody):
            prepared.on_done = body.on_done
            if body.fd is not None:
                prepared.fd, prepared.close_fd = body.fd, True
        elif not isinstance(body, bytes | bytearray | memoryview):
            prepared.stream = aiter(body)
        try:
            no_body = request.method == "HEAD" or response.status in (204, 304)
            headers = [
                (n, v)
                for n, v in response.headers
                if n.lower() not in ("transfer-encoding", "content-length")
            ]
            handler_length = next(
                (v for n, v in response.headers if n.lower() == "content-length"), None
            )
            names = {n.lower() for n, _ in headers}
            if "date" not in names:
                headers.append(("Date", _http_date()))
            if self.config.server_name and "server" not in names:
                headers.append(("Server", self.config.server_name))
            if (
                self.h11.they_are_waiting_for_100_continue
                or self.must_close
                or self.h11.their_state is h11.ERROR
            ):
                headers.append(("Connection", "close"))

            if isinstance(body, bytes | bytearray | memoryview):
                data = bytes(body)
                if response.status in (204, 304):
                    pass
                elif request.method == "HEAD" and handler_length is not None:
                    headers.append(("Content-Length", handler_length))
                else:
                    headers.append(("Content-Length", str(len(data))))
                if not no_body:
                    prepared.data = data
            elif isinstance(body, FileBody):
                length = await self.open_file(body, prepared, open_it=not no_body)
                headers.append(("Content-Length", str(length)))
            else:
                if handler_length is not None:
                    headers.append(("Content-Length", handler_length))
                if no_body:
                    await prepared.release()
                else:
                    assert prepared.stream is not None
                    try:
                        prepared.first = await anext(prepared.stream)
                    except StopAsyncIteration:
                        prepared.first = None
            prepared.event = h11.Response(
                status_code=response.status,
                headers=headers,
                reason=_reason(response.status),
            )
            return prepared
        except BaseException:
            await prepared.release()
            raise

    async def open_file(self, body: FileBody, prepared: _Prepared, *, open_it: bool) -> int:
        """The length of a FileBody's range; leaves its fd open in ``prepared`` when
        ``open_it``, else never opens the file (HEAD) and releases a given fd."""
        await trio.lowlevel.checkpoint()
        if not open_it:
            if body.length is not None and body.fd is None:
                return body.length
            if prepared.fd is not None:
                size = os.fstat(prepared.fd).st_size
                await prepared.release()
            else:
                assert body.path is not None
                size = os.stat(body.path).st_size
            return _file_range_length(body, size)
        if prepared.fd is None:
            assert body.path is not None
            prepared.fd = os.open(body.path, os.O_RDONLY | os.O_CLOEXEC)
            prepared.close_fd = True
        length = _file_range_length(body, os.fstat(prepared.fd).st_size)
        prepared.offset, prepared.length = body.offset, length
        return length

    # ---- sending

    async def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        timeout = self.config.send_timeout
        limiter = self.config.send_limiter
        if limiter is not None and not limiter.limited:
            limiter = None  # unlimited now (its rate may change: see RateLimiter.set_rate)
        step = _SEND_SLICE if limiter is None else _LIMITED_SENDFILE
        for pos in range(0, len(view), step):
            part = view[pos : pos + step]
            if limiter is not None:
                await limiter.take(len(part))
            with trio.fail_after(timeout):
                await self.stream.send_all(part)

    async def send_parts(self, parts: list[Any]) -> None:
        if sum(len(p) for p in parts) <= _COALESCE_LIMIT:
            await self.send_bytes(b"".join(parts))
        else:
            for part in parts:
                if len(part):
                    await self.send_bytes(part)

    async def send_prepared(self, request: Request, p: _Prepared) -> int:
        """Send head and body; returns body bytes sent.  Raises _Aborted to close."""
        try:
            head = self.h11.send(p.event) or b""
        except h11.LocalProtocolError as exc:  # pragma: no cover - prepare validated it
            logger.error("cannot send response head: %s", exc)
            raise _Aborted from exc
        if p.fd is not None:
            await self.send_bytes(head)
            self.h11.send_with_data_passthrough(h11.Data(data=cast(bytes, _Placeholder(p.length))))
            sent = await self.send_file(p.fd, p.offset, p.length)
            await p.release()  # close the file before the client can see the end
            await self.send_bytes(self.h11.send(h11.EndOfMessage()) or b"")
            return sent
        if p.stream is not None:
            return await self.send_stream(request, head, p)
        parts: list[Any] = [head]
        if p.data:
            parts += self.h11.send_with_data_passthrough(h11.Data(data=p.data)) or []
        parts.append(self.h11.send(h11.EndOfMessage()) or b"")
        await self.send_parts(parts)
        self.body_sent += len(p.data)
        return len(p.data)

    async def send_stream(self, request: Request, head: bytes, p: _Prepared) -> int:
        assert p.stream is not None
        sent = 0
        pending: list[Any] = [head]
        chunk = p.first
        p.first = None
        try:
            while chunk is not None:
                if isinstance(chunk, FileChunk):
                    try:
                        sent += await self._send_file_chunk(chunk, pending)
                    finally:
                        chunk.close()
                    pending = []
                elif chunk:
                    pending += self.h11.send_with_data_passthrough(h11.Data(data=chunk)) or []
                    await self.send_parts(pending)
                    pending = []
                    sent += len(chunk)
                    self.body_sent += len(chunk)
                try:
                    chunk = await anext(p.stream)
                except StopAsyncIteration:
                    chunk = None
            pending.append(self.h11.send(h11.EndOfMessage()) or b"")
            await self.send_parts(pending)
        except h11.LocalProtocolError as exc:
            logger.warning(
                "response body of %s %s does not match its Content-Length (%s); closing",
                request.method,
                request.path,
                exc,
            )
            raise _Aborted from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            raise
        except (HTTPError, P2PDistError) as exc:
            logger.warning(
                "response body of %s %s failed after the status was sent: %s",
                request.method,
                request.path,
                exc,
            )
            raise _Aborted from exc
        except Exception as exc:
            logger.exception(
                "response body of %s %s failed after the status was sent",
                request.method,
                request.path,
            )
            raise _Aborted from exc
        return sent

    async def _send_file_chunk(self, chunk: FileChunk, pending: list[Any]) -> int:
        """Send ``pending`` bytes, then the chunk with sendfile (its framing from h11:
        nothing around it with Content-Length, a chunk header and CRLF when chunked)."""
        if not chunk.length:
            await self.send_parts(pending)
            return 0
        sent = 0
        parts = self.h11.send_with_data_passthrough(
            h11.Data(data=cast(bytes, _Placeholder(chunk.length)))
        )
        for part in parts or []:
            if isinstance(part, _Placeholder):
                await self.send_parts(pending)
                pending = []
                sent = await self.send_file(chunk.fd, chunk.offset, chunk.length)
                if sent != chunk.length:
                    logger.warning("file shrank while being sent; closing the connection")
                    raise _Aborted
            else:
                pending.append(part)
        await self.send_parts(pending)
        return sent

    async def send_file(self, fd: int, offset: int, length: int) -> int:
        stream = self.stream
        if isinstance(stream, trio.SocketStream) and length:
            sent = await self._sendfile(stream.socket, fd, offset, length)
            if sent < 0:  # sendfile unsupported for this pair: fall back
                return await self._pread_send(fd, offset, length)
            return sent
        return await self._pread_send(fd, offset, length)

    async def _sendfile(
        self, sock: trio.socket.SocketType, fd: int, offset: int, length: int
    ) -> int:
        """Zero-copy; returns -1 if sendfile is unusable before any byte went out."""
        sock_fd = sock.fileno()
        sent = 0
        timeout = self.config.send_timeout
        limiter = self.config.send_limiter
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            while sent < length:
                # Looked at per slice: the limit may be changed (or lifted) mid-body.
                limited = limiter is not None and limiter.limited
                want = min(length - sent, _LIMITED_SENDFILE if limited else _SENDFILE_MAX)
                if limiter is not None and limited:
                    await limiter.take(want)
                try:
                    n = os.sendfile(sock_fd, fd, offset + sent, want)
                except BlockingIOError:
                    if limiter is not None and limited:
                        limiter.refund(want)  # not sent
                    await trio.lowlevel.wait_writable(sock)
                    continue
                except OSError as exc:
                    if sent == 0 and exc.errno in _SENDFILE_UNSUPPORTED:
                        return -1
                    raise trio.BrokenResourceError(f"sendfile: {exc}") from exc
                if n == 0:
                    logger.warning("file shrank while being sent; closing the connection")
                    raise _Aborted
                if limiter is not None and limited and n < want:
                    limiter.refund(want - n)  # the rest was not sent
                sent += n
                self.body_sent += n
                if sent < length:
                    scope.deadline = trio.current_time() + timeout
                    await trio.lowlevel.checkpoint()  # fairness: let other tasks run
        if scope.cancelled_caught:
            raise trio.TooSlowError
        return sent

    async def _pread_send(self, fd: int, offset: int, length: int) -> int:
        buf = bytearray(min(_FALLBACK_CHUNK, max(length, 1)))
        view = memoryview(buf)
        sent = 0
        while sent < length:
            want = min(len(buf), length - sent)
            n = os.preadv(fd, [view[:want]], offset + sent)
            if n == 0:
                logger.warning("file shrank while being sent; closing the connection")
                raise _Aborted
            await self.send_bytes(view[:n])
            sent += n
            self.body_sent += n
        return sent

    async def send_protocol_error(self, status: int, message: str) -> None:
        """Answer client garbage (no handler involved), then close."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = _error_body(_default_code(status), message[:200])
        event = h11.Response(
            status_code=status,
            reason=_reason(status),
            headers=[
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
                ("Date", _http_date()),
            ],
        )
        try:
            data = (self.h11.send(event) or b"") + (self.h11.send(h11.Data(data=body)) or b"")
            data += self.h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:  # pragma: no cover - state checked above
            return
        await self.send_bytes(data)
        await self.linger_close()

    async def linger_close(self) -> None:
        """Half-close and read (briefly) what the client still sends, so that closing
        does not reset the connection before it has read our response."""
        stream = self.stream
        if not isinstance(stream, trio.abc.HalfCloseableStream):
            return
        with trio.move_on_after(_LINGER_SECONDS):
            try:
                await stream.send_eof()
                received = 0
                while received < _LINGER_BYTES:
                    data = await stream.receive_some(_RECV_SIZE)
                    if not data:
                        break
                    received += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass


class _Placeholder:
    """Stands in for sendfile'd bytes so that h11 counts them (h11's sendfile hook)."""

    __slots__ = ("_n",)

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n


def _file_range_length(body: FileBody, size: int) -> int:
    if body.offset > size:
        raise ValueError(f"FileBody offset {body.offset} beyond the end of the file ({size})")
    length = size - body.offset if body.length is None else body.length
    if body.offset + length > size:
        raise ValueError(
            f"FileBody range {body.offset}+{length} beyond the end of the file ({size})"
        )
    return length
