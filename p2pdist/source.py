"""Where bytes come from: the protocol every back-to-source origin implements.

A :class:`Source` is one remote object (a registry blob, a plain HTTP(S) URL).  The
downloader asks it once for its size and whether it serves byte ranges, then opens
ranges — many at once — and streams them.  Implementations retry *opening* a range
(connection errors, 5xx, 429) themselves; an error in the middle of a stream surfaces as
:class:`~p2pdist.errors.NetworkError` and the downloader refetches that piece.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Source", "SourceInfo"]


@dataclass(frozen=True, slots=True)
class SourceInfo:
    size: int | None
    """Total size in bytes, or ``None`` when the origin does not say."""
    accepts_ranges: bool
    """True when ``open_range`` with a start > 0 or an end is honoured (HTTP 206)."""


class Source(Protocol):
    @property
    def description(self) -> str:
        """A short human name for messages (never contains credentials)."""
        ...

    async def probe(self) -> SourceInfo: ...

    def open_range(
        self, start: int, end: int | None
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream bytes ``[start, end)`` (``end=None``: to the end of the object).

        The iterator yields exactly ``end - start`` bytes or raises; implementations check
        the response's ``Content-Range``/``Content-Length`` before yielding anything.
        """
        ...
