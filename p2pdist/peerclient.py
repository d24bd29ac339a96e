"""A lean client for piece GETs to other daemons (the hot path of a rollout), and for
the scheduler's event POSTs (one or more per piece).

Parents are our own peer servers, so the exchange is narrow and known: ``GET`` a piece
path, a ``200`` with ``Content-Length`` (raw, or ``Content-Encoding: zstd``), keep-alive.
The request is written by hand on a pooled socket and the body read with ``recv_into``
straight into the piece's buffer — no per-chunk copies, no HTTP library layers per read.
On a shaped link bytes trickle in a few KiB at a time; ``SO_RCVLOWAT`` makes the kernel
wake us only once 64 KiB (or the rest of the body) is there, instead of for every
segment (measured: most of a daemon's CPU in an emulated rollout went to those wakeups).

Anything unexpected — another status, no ``Content-Length``, chunked framing, a body
longer than allowed, a closed or silent connection — is a :class:`~p2pdist.peer.PeerError`
and the connection is dropped; the swarm then reports the parent and asks elsewhere.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import trio

from .errors import NetworkError
from .http1 import BadHead, ClosedBeforeHead, parse_response_head, read_response_head

__all__ = ["PeerConnections", "PieceResponse"]

T = TypeVar("T")

_HEAD_LIMIT = 16 * 1024
_LOWAT = 64 * 1024
READ_TIMEOUT = 30.0
CONNECT_TIMEOUT = 5.0


class _Failed(NetworkError):
    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PieceResponse:
    """A piece body read into ``buf[:length]``, with its ``Content-Encoding``."""

    __slots__ = ("buf", "encoding", "length")

    def __init__(self, buf: bytearray, length: int, encoding: str) -> None:
        self.buf = buf
        self.length = length
        self.encoding = encoding


class PeerConnections:
    """Keep-alive connections to parents, ``max_idle`` kept per parent address."""

    def __init__(self, headers: Mapping[str, str] | None = None, *, max_idle: int = 8) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._extra = extra.encode("latin-1")
        self._idle: dict[str, list[trio.SocketStream]] = {}
        self._max_idle = max_idle
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for stream in streams:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _connect(self, addr: str, *, fresh: bool = False) -> tuple[trio.SocketStream, bool]:
        pooled = self._idle.get(addr)
        if pooled and not fresh:
            return pooled.pop(), True
        host, _, port = addr.rpartition(":")
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
        except (OSError, ValueError) as exc:
            raise _Failed(f"cannot connect: {getattr(exc, 'strerror', None) or exc}") from None
        except trio.TooSlowError:
            raise _Failed(f"no connection within {CONNECT_TIMEOUT:.0f}s") from None
        return stream, False

    async def _drop_idle(self, addr: str) -> None:
        for stream in self._idle.pop(addr, []):
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def _keep(self, addr: str, stream: trio.SocketStream) -> bool:
        pool = self._idle.setdefault(addr, [])
        if self._closed or len(pool) >= self._max_idle:
            return False
        pool.append(stream)
        return True

    async def get(
        self,
        addr: str,
        path: str,
        *,
        accept_zstd: bool,
        limit: int,
        throttle: Callable[[int], Awaitable[None]] | None = None,
    ) -> PieceResponse:
        """``GET path`` from ``addr``; the body (at most ``limit`` bytes) in one buffer.
        Raises NetworkError (``.status`` set for an HTTP answer other than 200)."""
        return await self._pooled(
            addr, lambda stream: self._exchange(stream, addr, path, accept_zstd, limit, throttle)
        )

    async def _pooled(
        self, addr: str, exchange: Callable[[trio.SocketStream], Awaitable[tuple[T, bool]]]
    ) -> T:
        """``exchange`` on a pooled connection to ``addr`` (it says whether the connection
        may be kept), once more on a fresh one if the pooled one was stale."""
        for attempt in (0, 1):
            stream, reused = await self._connect(addr, fresh=attempt > 0)
            keep = False
            try:
                try:
                    result, keep = await exchange(stream)
                except _Stale:
                    if reused and attempt == 0:
                        # A pooled connection the parent had closed (idle timeout): the
                        # others pooled for it are as old; drop them, and retry afresh.
                        await self._drop_idle(addr)
                        continue
                    raise _Failed("connection closed before an answer") from None
                return result
            finally:
                if not (keep and self._keep(addr, stream)):
                    with trio.CancelScope(shield=True):
                        await stream.aclose()
        raise AssertionError("unreachable")

    async def post(
        self, addr: str, path: str, body: bytes, *, limit: int = 1 << 20
    ) -> tuple[int, bytes]:
        """``POST path`` with a JSON ``body`` to ``addr`` (the scheduler's event API):
        ``(status, answer body)``, the answer at most ``limit`` bytes.  Raises
        NetworkError when there is no usable answer."""
        return await self._pooled(
            addr, lambda stream: self._post_exchange(stream, addr, path, body, limit)
        )

    async def _post_exchange(
        self, stream: trio.SocketStream, addr: str, path: str, body: bytes, limit: int
    ) -> tuple[tuple[int, bytes], bool]:
        request = (
            (
                f"POST {path} HTTP/1.1\r\nHost: {addr}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            ).encode("latin-1")
            + self._extra
            + b"\r\n"
            + body
        )
        status, headers, rest = await _send_request(stream, request)
        length = _content_length(headers, status)
        if length > limit:
            raise _Failed(f"answer of {length} bytes, more than {limit}")
        data = bytearray(rest)
        if len(data) > length:
            raise _Failed("sent more than its Content-Length")
        try:
            with trio.fail_after(READ_TIMEOUT):
                while len(data) < length:
                    chunk = await stream.receive_some(length - len(data))
                    if not chunk:
                        raise _Failed(f"connection closed after {len(data)} of {length} bytes")
                    data += chunk
        except (OSError, trio.BrokenResourceError) as exc:
            raise _Failed(f"connection broken after {len(data)} of {length} bytes") from exc
        except trio.TooSlowError:
            raise _Failed(f"no data for {READ_TIMEOUT:.0f}s") from None
        keep = headers.get("connection", "").lower() != "close"
        return (status, bytes(data)), keep

    async def _exchange(
        self,
        stream: trio.SocketStream,
        addr: str,
        path: str,
        accept_zstd: bool,
        limit: int,
        throttle: Callable[[int], Awaitable[None]] | None,
    ) -> tuple[PieceResponse, bool]:
        request = (
            (
                f"GET {path} HTTP/1.1\r\nHost: {addr}\r\n"
                f"Accept-Encoding: {'zstd, identity' if accept_zstd else 'identity'}\r\n"
            ).encode("latin-1")
            + self._extra
            + b"\r\n"
        )
        status, headers, rest = await _send_request(stream, request)
        length = _content_length(headers, status)
        if status != 200:
            raise _Failed(f"answered {status}", status=status)
        if length > limit:
            raise _Failed(f"sent {length} bytes where at most {limit} fit")
        encoding = headers.get("content-encoding", "identity").lower()
        buf = bytearray(length)
        view = memoryview(buf)
        got = len(rest)
        if got > length:
            raise _Failed("sent more than its Content-Length")
        view[:got] = rest
        if throttle is not None and got:
            await throttle(got)
        sock = stream.socket
        while got < length:
            want = length - got
            lowat = min(_LOWAT, want)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                with trio.fail_after(READ_TIMEOUT):
                    n = await sock.recv_into(view[got:], want)
            except OSError as exc:
                raise _Failed(f"connection broken after {got} of {length} bytes") from exc
            except trio.TooSlowError:
                raise _Failed(f"no data for {READ_TIMEOUT:.0f}s") from None
            if n == 0:
                raise _Failed(f"connection closed after {got} of {length} bytes")
            got += n
            if throttle is not None:
                await throttle(n)
        keep = headers.get("connection", "").lower() != "close"
        if keep:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return PieceResponse(buf, length, encoding), keep


async def _send_request(
    stream: trio.SocketStream, request: bytes
) -> tuple[int, dict[str, str], bytes]:
    """Send ``request``; the answer's status, headers and the bytes read past its head.
    :class:`_Stale` when the connection failed before any answer."""
    try:
        with trio.fail_after(READ_TIMEOUT):
            await stream.send_all(request)
            head, rest = await read_response_head(stream, _HEAD_LIMIT)
        status, headers = parse_response_head(head)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        raise _Stale() from None
    except ClosedBeforeHead as exc:
        if exc.partial:
            raise _Failed("connection closed inside the answer head") from None
        raise _Stale() from None
    except BadHead as exc:
        raise _Failed(str(exc)) from None
    except trio.TooSlowError:
        raise _Failed(f"no answer for {READ_TIMEOUT:.0f}s") from None
    return status, headers, rest


def _content_length(headers: Mapping[str, str], status: int) -> int:
    length_text = headers.get("content-length", "")
    if (
        "transfer-encoding" in headers
        or not (length_text.isascii() and length_text.isdigit())
        or len(length_text) > 15
    ):
        raise _Failed("answer without a Content-Length", status=status)
    return int(length_text)


class _Stale(Exception):
    """The connection failed before any answer (a pooled one the parent closed)."""
