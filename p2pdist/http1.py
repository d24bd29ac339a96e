"""Reading an HTTP/1.x response head by hand, for the two lean clients on hot paths
(:mod:`p2pdist.registry._fastrange` for registry Range bodies, :mod:`p2pdist.peerclient`
for pieces from other daemons).  Strict: anything odd is :class:`BadHead` and the caller
decides what that means (fall back to httpx, or give up on the parent)."""

from __future__ import annotations

import re

import trio

__all__ = ["BadHead", "ClosedBeforeHead", "parse_response_head", "read_response_head"]

_STATUS = re.compile(rb"HTTP/1\.([01]) (\d{3})(?: [^\r\n]*)?")
_FRAMING = frozenset({"content-length", "content-range", "transfer-encoding", "connection"})


class BadHead(Exception):
    """A response head this reader does not accept (too large, malformed, ambiguous)."""


class ClosedBeforeHead(BadHead):
    """The connection ended before a complete head (``partial``: some of it had come)."""

    def __init__(self, partial: bool) -> None:
        super().__init__("connection closed before the response head")
        self.partial = partial


async def read_response_head(stream: trio.SocketStream, limit: int) -> tuple[bytes, bytes]:
    """``(head, rest)``: the head up to the blank line, and the body bytes read with it."""
    buf = bytearray()
    while True:
        idx = buf.find(b"\r\n\r\n")
        if idx >= 0:
            return bytes(buf[:idx]), bytes(buf[idx + 4 :])
        if len(buf) > limit:
            raise BadHead("response head too large")
        chunk = await stream.receive_some(limit)
        if not chunk:
            raise ClosedBeforeHead(partial=bool(buf))
        buf += chunk


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    """``(status, headers)`` with lower-case names; a repeated framing header is refused,
    and an HTTP/1.0 answer without ``Connection: keep-alive`` reads as ``close``."""
    lines = head.split(b"\r\n")
    m = _STATUS.fullmatch(lines[0])
    if m is None:
        raise BadHead("malformed status line")
    minor, status = m.group(1), int(m.group(2))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise BadHead("malformed header")
        key = name.decode("latin-1").lower()
        if key in headers and key in _FRAMING:  # repeated framing headers: ambiguous
            raise BadHead("repeated framing header")
        headers[key] = value.strip().decode("latin-1")
    if minor == b"0" and headers.get("connection", "").lower() != "keep-alive":
        headers["connection"] = "close"  # HTTP/1.0 closes unless told otherwise
    return status, headers
