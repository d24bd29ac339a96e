"""The peer protocol: how daemons hand each other verified pieces.

One endpoint on the peer server::

    GET /peer/v1/blobs/<digest>/pieces/<index>?piece_size=<bytes>

answers the bytes of piece ``index`` of blob ``digest`` cut with ``piece_size`` — only if
this node has verified that piece (404 otherwise; 409 when the node's piece plan for the
blob differs).  When the request says ``Accept-Encoding: zstd`` and the piece compresses
(uncompressed tar layers, configs, plain files; not gzip layers), it is sent
zstd-compressed with ``Content-Encoding: zstd``; otherwise it is sent raw with
``sendfile``.  The receiver decompresses (bounded to the piece length) and checks the
**sha256 of the decompressed bytes** against the task's piece-hash list before storing
them, so a parent can neither corrupt nor inflate what it sends.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio
import zstandard

from .digest import Digest
from .errors import NetworkError
from .peerclient import PeerConnections
from .pieces import PiecePlan

__all__ = [
    "PIECE_PATH",
    "CompressionCache",
    "PeerError",
    "PieceLocation",
    "compress_if_worth_it",
    "decompress_piece",
    "fetch_piece",
    "parse_piece_path",
    "piece_url",
    "report_bad_piece",
]

PIECE_PATH = "/peer/v1/blobs/{digest}/pieces/{index}"
_SAMPLE = 64 * 1024
_WORTH_IT = 0.90  # send compressed only when it saves at least 10%
ZSTD_LEVEL = 1


class PeerError(NetworkError):
    """A parent could not give us a piece (refused, unreachable, malformed answer)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class PieceLocation:
    """Where a verified piece's bytes are on this node's disk."""

    path: Path
    offset: int
    length: int


def piece_url(parent_addr: str, digest: Digest, index: int, piece_size: int) -> str:
    path = PIECE_PATH.format(digest=digest, index=index)
    return f"http://{parent_addr}{path}?piece_size={piece_size}"


def parse_piece_path(path: str) -> tuple[Digest, int] | None:
    """``(digest, index)`` from a piece path, None when the path is not one; raises
    :class:`InvalidDigest` / ``ValueError`` for a malformed one."""
    parts = path.split("/")
    # ["", "peer", "v1", "blobs", digest, "pieces", index]
    if len(parts) != 7 or parts[1:4] != ["peer", "v1", "blobs"] or parts[5] != "pieces":
        return None
    digest = Digest.parse(parts[4])
    if not (parts[6].isascii() and parts[6].isdigit()) or len(parts[6]) > 9:
        raise ValueError(f"invalid piece index {parts[6][:20]!r}")
    return digest, int(parts[6])


class CompressionCache:
    """Compressed pieces, or the verdict that a piece does not compress, for the pieces
    most recently asked for: a piece usually goes to several children in a row."""

    def __init__(self, max_bytes: int = 16 << 20, max_items: int = 4096) -> None:
        self._max = max_bytes
        self._max_items = max_items
        self._used = 0
        self._items: OrderedDict[tuple[str, int, int], bytes | None] = OrderedDict()
        self._lock = threading.Lock()

    def forget(self, digest: str) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0].split("/")[0] == digest]:
                old = self._items.pop(key)
                self._used -= len(old) if old else 0

    def get_or_compress(
        self,
        key: tuple[str, int, int],
        read: Callable[[], bytes],
        sample: Callable[[], bytes] | None = None,
    ) -> bytes | None:
        """The zstd frame for the piece, or None when it is not worth compressing
        (``sample``, the piece's first bytes, decides that before the whole piece is
        read).  Blocking: call it in a worker thread."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        if sample is not None and not worth_compressing(sample()):
            result = None
        else:
            result = compress_if_worth_it(read())
        with self._lock:
            self._items[key] = result
            self._used += len(result) if result else 0
            while (self._used > self._max or len(self._items) > self._max_items) and self._items:
                _, old = self._items.popitem(last=False)
                self._used -= len(old) if old else 0
        return result


def worth_compressing(sample: bytes) -> bool:
    """Whether a piece that starts with ``sample`` (its first 64 KiB) may compress by
    at least 10%."""
    if len(sample) < 4096:
        return False
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return len(cctx.compress(sample[:_SAMPLE])) <= _WORTH_IT * len(sample[:_SAMPLE])


def compress_if_worth_it(data: bytes) -> bytes | None:
    """zstd-compress ``data`` when that saves at least 10%; a 64 KiB sample decides first,
    so incompressible (gzip) pieces cost almost nothing."""
    if not worth_compressing(data[:_SAMPLE]):
        return None
    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    frame = cctx.compress(data)
    return frame if len(frame) <= _WORTH_IT * len(data) else None


def decompress_piece(frame: bytes | bytearray | memoryview, length: int) -> bytes:
    """Decompress a zstd piece, refusing to produce more than ``length`` bytes.

    ``max_output_size`` is ignored by zstandard when the frame declares its content size,
    so a frame declaring more than ``length`` is refused before decompressing, and the
    output is read through a bounded stream reader (never more than ``length + 1``)."""
    try:
        declared = zstandard.frame_content_size(frame)
        if declared not in (-1, length):  # -1: not declared
            raise PeerError(f"zstd piece declares {declared} bytes, expected {length}")
        with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
            out = reader.read(length + 1)
    except zstandard.ZstdError as exc:
        raise PeerError(f"bad zstd piece: {exc}") from None
    if len(out) != length:
        raise PeerError(f"zstd piece decompressed to {len(out)} bytes, expected {length}")
    return out


async def fetch_piece(
    conns: PeerConnections,
    parent_addr: str,
    digest: Digest,
    index: int,
    plan: PiecePlan,
    *,
    accept_zstd: bool = True,
    throttle: Callable[[int], Awaitable[None]] | None = None,
) -> tuple[bytes | bytearray, int]:
    """Fetch piece ``index`` from a parent: ``(piece bytes, bytes on the wire)``.

    The bytes are NOT verified here: the caller checks them against the piece-hash list
    (``Task.write_piece(..., expected_sha256=...)``) before anything else sees them."""
    length = plan.length(index)
    path = f"{PIECE_PATH.format(digest=digest, index=index)}?piece_size={plan.piece_size}"
    limit = length + length // 8 + 1024 if accept_zstd else length
    try:
        resp = await conns.get(
            parent_addr, path, accept_zstd=accept_zstd, limit=limit, throttle=throttle
        )
    except NetworkError as exc:
        status = getattr(exc, "status", None)
        raise PeerError(f"parent {parent_addr}: {exc}", status=status) from None
    wire = resp.length
    if resp.encoding == "zstd" and accept_zstd:
        data = await trio.to_thread.run_sync(decompress_piece, resp.buf, length)
        return data, wire
    if resp.encoding not in ("identity", "zstd"):
        raise PeerError(f"parent {parent_addr} sent unknown encoding {resp.encoding!r}")
    if resp.encoding != "identity" or wire != length:
        raise PeerError(f"parent {parent_addr} sent {wire} bytes of piece {index}, not {length}")
    return resp.buf, wire


async def report_bad_piece(
    client: httpx.AsyncClient, parent_addr: str, digest: Digest, index: int
) -> None:
    """Tell a parent that a piece it sent failed its sha256, so it re-verifies what it
    holds.  Best effort: errors are ignored."""
    url = f"http://{parent_addr}{PIECE_PATH.format(digest=digest, index=index)}?report=bad"
    with contextlib.suppress(httpx.HTTPError, httpx.InvalidURL), trio.move_on_after(5):
        await client.post(url)
